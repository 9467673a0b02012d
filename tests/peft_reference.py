"""Stock PEFT as the independent reference: adapters loaded with every key checked (PEFT itself only warns)."""

from __future__ import annotations

import warnings


def peft_strict_load(peft_model, folder, adapter_name: str):
    """Load an adapter into a PeftModel and fail on any missing or unexpected key (PEFT itself only warns)."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    result = peft_model.load_adapter(str(folder), adapter_name=adapter_name)
    assert list(result.missing_keys) == [], f"missing adapter keys: {result.missing_keys}"
    assert list(result.unexpected_keys) == [], f"unexpected keys: {result.unexpected_keys}"
    saved = load_peft_weights(str(folder), device="cpu")
    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    assert set(saved) == set(expected), f"saved keys differ: {set(saved) ^ set(expected)}"
    for k, v in saved.items():
        assert expected[k].shape == v.shape and bool((expected[k].cpu() == v).all()), k
    return result


def peft_from_pretrained_strict(base, folder, adapter_name: str = "a"):
    """PeftModel.from_pretrained, asserting PEFT warned about no missing/unexpected keys; then a strict key check."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(folder), adapter_name=adapter_name)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower()
           or "unexpected" in str(w.message).lower()]
    assert bad == [], bad
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved = load_peft_weights(str(folder), device="cpu")
    loaded = get_peft_model_state_dict(pm, adapter_name=adapter_name)
    assert set(saved) == set(loaded), f"saved vs loaded keys differ: {set(saved) ^ set(loaded)}"
    for k, v in saved.items():
        assert bool((loaded[k].cpu() == v).all()), k
    return pm
