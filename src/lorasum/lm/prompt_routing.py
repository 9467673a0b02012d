"""A prompt-level router: choose the adapter for a request from its question alone, never its answer.

Each example's feature is the base model's last hidden state averaged over the prompt tokens
(`Question: q\\nAnswer:`, truncated as the eval truncates it); each domain's centroid is the mean feature of its
training questions. An example goes to the nearest centroid in Euclidean distance (top-1), or is scored by the
mixture of the adapters' predictions with weights softmax(−‖x − c_k‖² / (τ·σ²)) (soft), σ² the mean squared distance
of a training question to its own centroid. The base model computes every feature (no adapter applied), so the
choice depends on the prompt and the base weights only.
"""

from __future__ import annotations

import numpy as np
import torch

from ..delta.factors import Adapter
from ..errors import LorasumError
from .data import DataConfig, Example, load_domain, partition_domains, tokenize_records
from .models import LoadedModel


def prompt_ids(e: Example) -> list[int]:
    """The prompt part of a tokenized example (its answer tokens dropped): what the router may see."""
    return [t for t, a in zip(e.input_ids, e.answer_mask) if not a]


@torch.no_grad()
def prompt_features(loaded: LoadedModel, examples: list[Example], batch_size: int = 16) -> np.ndarray:
    """(n, hidden) float64: the base model's last hidden state, mean over each example's prompt tokens."""
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        ids = [prompt_ids(e) for e in examples[start:start + batch_size]]
        n = max(len(x) for x in ids)
        batch = torch.full((len(ids), n), pad, dtype=torch.long)  # (b, n)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
        with loaded.autocast():
            h = model(input_ids=batch.to(device), attention_mask=mask.to(device),
                      output_hidden_states=True).hidden_states[-1].float()  # (b, n, hidden)
        m = mask.to(device).unsqueeze(-1).float()
        out.append(((h * m).sum(1) / m.sum(1)).double().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, k): ‖x_i − c_k‖²."""
    return ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)


def soft_weights(dist: np.ndarray, scale: float, temperature: float) -> np.ndarray:
    """(n, k) routing weights softmax(−d² / (τ·σ²)) over the candidate adapters."""
    z = -dist / (temperature * scale)
    z -= z.max(1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(1, keepdims=True)


def mixture_nll(nll: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(…, n) −log Σ_k w_k·exp(−NLL_k): each example's NLL under the mixture of the adapters' predictions.
    `nll`: (…, n, k) per adapter; `weights`: (n, k)."""
    logw = np.log(np.clip(weights, 1e-300, None))
    a = logw - nll  # (…, n, k)
    top = a.max(-1, keepdims=True)
    return -(top[..., 0] + np.log(np.exp(a - top).sum(-1)))


def training_centroids(loaded: LoadedModel, adapters: list[Adapter], data: DataConfig, max_length: int,
                       batch_size: int = 16) -> np.ndarray:
    """(k, hidden): each adapter's centroid over the training questions it was trained on, as its lorasum.json
    records them (partition, fields, split seed, cap), read from `data`'s folder when one is given."""
    out = []
    for a in adapters:
        meta = a.lorasum if isinstance(a.lorasum, dict) else {}
        rec = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        if not isinstance(meta.get("partition"), str):
            raise LorasumError(f"--route prompt routes to each adapter's training domain, and '{a.name}' has no "
                               "lorasum.json naming it (train it with `lorasum train`)", key="adapter")
        cap = (rec.get("max_records") or {}).get("train")
        cfg = DataConfig(data.data_dir or rec.get("data_dir"), rec.get("question_field", data.question_field),
                         rec.get("answer_field", data.answer_field), rec.get("split_seed", data.split_seed),
                         {"train": cap} if isinstance(cap, int) else {})
        examples = [e for d in partition_domains(meta["partition"])
                    for e in tokenize_records(loaded.tokenizer, load_domain(d, cfg).records["train"], max_length)]
        out.append(prompt_features(loaded, examples, batch_size).mean(0))
    return np.stack(out)


def prompt_choices(loaded: LoadedModel, terms: list[tuple[Adapter, float]], examples: dict[str, list[Example]],
                   data: DataConfig, max_length: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """{domain: (n,) index of the adapter each example goes to}: the nearest training centroid of its prompt."""
    if len(terms) < 2 or any(w != 1.0 for _, w in terms):
        raise LorasumError("--route prompt chooses one of at least two adapters, each at weight 1", key="route")
    centroids = training_centroids(loaded, [a for a, _ in terms], data, max_length, batch_size)
    return {d: squared_distances(prompt_features(loaded, exs, batch_size), centroids).argmin(1)
            for d, exs in examples.items()}
