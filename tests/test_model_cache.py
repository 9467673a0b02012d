"""The converted copy of a GGUF model: the same weights bit for bit and the same tokens as the GGUF itself, used only
when its weights hash to the fingerprint it recorded, rebuilt otherwise, and never a reason for a load to fail."""

from __future__ import annotations

import pytest
import torch

from lorasum.lm import model_cache, models
from lorasum.lm.model_cache import CACHE_ENV, STAMP, cache_root, converted_folder, load_converted, save_converted
from lorasum.lm.models import load_model, weights_fingerprint


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_root() is None and converted_folder(tmp_path / "m.gguf") is None
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CACHE_ENV, "rel")
    assert cache_root() == tmp_path / "rel"  # absolute: a later chdir does not move it
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lorasum"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(model_cache.Path, "home", staticmethod(no_home))
    assert cache_root() is None  # no cache rather than a traceback


def test_an_unreadable_gguf_has_no_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert converted_folder(tmp_path / "missing.gguf") is None  # reading the GGUF itself then names the problem


def test_the_folder_is_named_by_the_file_content(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for f, data in ((a, b"GGUF one"), (b, b"GGUF two")):
        f.parent.mkdir()
        f.write_bytes(data)
    assert converted_folder(a) != converted_folder(b)  # same name, other bytes: another copy
    b.write_bytes(b"GGUF one")
    assert converted_folder(a) == converted_folder(b)  # the same bytes elsewhere: the same copy
    assert converted_folder(a).parent == tmp_path / "c" / "models" and converted_folder(a).name.startswith("m-")


def test_a_saved_copy_loads_the_same_weights_and_tokens(tmp_path):
    tiny = load_model("tiny-llama", device="cpu")
    folder = tmp_path / "copy"
    save_converted(folder, tiny.model, tiny.tokenizer, weights_fingerprint)
    model, tok = load_converted(folder, weights_fingerprint)
    assert same_weights(model, tiny.model)
    text = "red green blue?"
    assert tok(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]


@pytest.mark.parametrize("damage", ["edited", "truncated", "config edited", "no stamp", "foreign stamp"])
def test_a_damaged_copy_is_not_used(tmp_path, damage):
    tiny = load_model("tiny-llama", device="cpu")
    folder = tmp_path / "copy"
    save_converted(folder, tiny.model, tiny.tokenizer, weights_fingerprint)
    assert load_converted(folder, weights_fingerprint) is not None
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "edited":  # same size, one weight changed: only the fingerprint can tell
        data[-4] ^= 0x40
        weights.write_bytes(bytes(data))
        from transformers import AutoModelForCausalLM

        assert not same_weights(AutoModelForCausalLM.from_pretrained(folder), tiny.model)  # it loads, changed
    elif damage == "truncated":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "config edited":  # weights intact, the architecture changed: the stamp's file hashes tell
        cfg = folder / "config.json"
        text = cfg.read_text()
        assert '"rope_theta"' in text
        cfg.write_text(text.replace('"rope_theta"', '"rope_theta_was"'))
    elif damage == "no stamp":
        (folder / STAMP).unlink()
    else:
        (folder / STAMP).write_text('["not", "a", "stamp"]')
    assert load_converted(folder, weights_fingerprint) is None


def test_an_unwritable_cache_only_costs_time(tmp_path, monkeypatch):
    tiny = load_model("tiny-llama", device="cpu")
    root = tmp_path / "cache"
    root.write_text("a file where the cache folder should be")  # (tests may run as root: no chmod)
    save_converted(root / "models" / "copy", tiny.model, tiny.tokenizer, weights_fingerprint)  # no error
    assert root.read_text() == "a file where the cache folder should be"

    class DiskFull(Exception):  # safetensors raises its own error type, not OSError, on a full disk
        pass

    def full(*args, **kwargs):
        raise DiskFull("No space left on device (os error 28)")

    monkeypatch.setattr(tiny.model, "save_pretrained", full)
    save_converted(tmp_path / "other", tiny.model, tiny.tokenizer, weights_fingerprint)  # no error
    assert not (tmp_path / "other").exists()


def test_a_copy_published_first_is_kept_and_a_damaged_one_replaced(tmp_path):
    tiny, other = load_model("tiny-llama", device="cpu"), load_model("tiny-gpt2", device="cpu")
    folder = tmp_path / "copy"
    save_converted(folder, tiny.model, tiny.tokenizer, weights_fingerprint)
    save_converted(folder, other.model, other.tokenizer, weights_fingerprint)  # another writer came second
    assert same_weights(load_converted(folder, weights_fingerprint)[0], tiny.model)
    (folder / STAMP).unlink()
    save_converted(folder, other.model, other.tokenizer, weights_fingerprint, replace=True)
    assert same_weights(load_converted(folder, weights_fingerprint)[0], other.model)


def test_a_gguf_is_converted_once_then_loaded_from_its_copy(tmp_path, monkeypatch):
    """The load path itself, with the conversion stubbed by tiny-llama: a miss writes the copy, a hit converts
    nothing, a damaged copy is converted again and rewritten, and a copy that cannot be written changes nothing."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "My.Q8_0.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def convert(path):
        calls.append(path)
        tiny = load_model("tiny-llama", device="cpu")
        return tiny.model, tiny.tokenizer

    monkeypatch.setattr(models, "_convert_gguf", convert)
    reference = load_model("tiny-llama", device="cpu").model
    first = load_model(str(gguf), device="cpu")
    folder = converted_folder(gguf)
    assert len(calls) == 1 and (folder / STAMP).is_file() and first.model_id == "My.Q8_0"
    again = load_model(str(gguf), device="cpu")
    assert len(calls) == 1 and same_weights(again.model, reference)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    rebuilt = load_model(str(gguf), device="cpu")
    assert len(calls) == 2 and same_weights(rebuilt.model, reference)
    assert load_converted(folder, weights_fingerprint) is not None  # rewritten whole
    monkeypatch.setenv(CACHE_ENV, str(gguf))  # a file where the cache folder should be: nothing can be written
    assert same_weights(load_model(str(gguf), device="cpu").model, reference) and len(calls) == 3


@pytest.mark.slow
def test_the_embedded_gguf_is_read_once_then_loaded_from_its_copy(smollm2, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = load_model("smollm2-135m", device="cpu")  # reads the GGUF, writes the copy
    folder = converted_folder(models.smollm2_folder() / models.SMOLLM2_GGUF)
    assert (folder / STAMP).is_file() and same_weights(first.model, smollm2.model)

    def no_conversion(path):
        raise AssertionError("the GGUF was read again although its copy is whole")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again = load_model("smollm2-135m", device="cpu")
    assert same_weights(again.model, smollm2.model) and again.model_id == "smollm2-135m"
    assert weights_fingerprint(again.model) == smollm2.fingerprint_at_load
    for text in ("What is 12% of 250?", "Ибупрофен: 200 mg — take with food."):
        assert again.tokenizer(text)["input_ids"] == smollm2.tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert again.tokenizer.apply_chat_template(chat, tokenize=False) == \
        smollm2.tokenizer.apply_chat_template(chat, tokenize=False)
    assert model_cache.load_converted(folder, weights_fingerprint) is not None
