"""Which entries a sparse (SHiRA) adapter trains: `adapter.selection` and `adapter.density`.

PEFT's SHiRA trains r * (in + out) entries of every target matrix; which ones is a mask PEFT
asks for per layer (`ShiraConfig.mask_fn(base_layer, r)`). Three choices:

* `random`: PEFT's own seeded mask (`random_seed` = the training seed), as before.
* `magnitude`: the entries with the largest |W| of each matrix.
* `gradient`: the entries with the largest gradient magnitude accumulated over a calibration
  pass: `calibration_batches` batches of the training data (a seeded shuffle, the same on
  every rank), the loss the trainer minimises, score = sum over batches of |dL/dW|, computed
  on the base model before the adapter exists (the adapter starts at zero, so this is the
  gradient its first step would see, over more data than one step).

For the non-random choices PEFT saves the chosen entries beside the values
(`...shira_indices` in adapter_model.safetensors), which PEFT and the server read back; no
seed is needed to rebuild them.

`density` is the same budget as a fraction of all target weights: the r whose
r * (in + out) entries per matrix come nearest to it (PEFT and the server keep one r for all
matrices, so the fraction differs by matrix shape; `density_for` reports the overall one).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from training.config import AdapterSettings

logger = logging.getLogger(__name__)


def target_linears(model: Any, target_modules: Sequence[str]) -> dict[str, Any]:
    """The decoder layers' linear modules PEFT adapts: path -> module (last name component in
    `target_modules`, as PEFT matches a list of names)."""
    import torch

    wanted = set(target_modules)
    return {
        path: module
        for path, module in model.named_modules()
        if ".layers." in f".{path}."
        and isinstance(module, torch.nn.Linear)
        and path.rsplit(".", 1)[-1] in wanted
    }


def _shapes(linears: dict[str, Any]) -> list[tuple[int, int]]:
    return [(module.in_features, module.out_features) for module in linears.values()]


def budget_count(in_features: int, out_features: int, r: int) -> int:
    """Entries SHiRA trains in one matrix: the count LoRA of rank r would train."""
    return r * (in_features + out_features)


def density_for(linears: dict[str, Any], r: int) -> float:
    """Trained fraction of all target weights at rank r."""
    shapes = _shapes(linears)
    trained = sum(budget_count(i, o, r) for i, o in shapes)
    return trained / sum(i * o for i, o in shapes)


def max_rank(linears: dict[str, Any]) -> int:
    """The largest r every target matrix can hold (PEFT refuses r * (in + out) > in * out)."""
    return min((i * o) // (i + o) for i, o in _shapes(linears))


def rank_for_density(linears: dict[str, Any], density: float) -> int:
    """The r whose budget comes nearest to `density` of the target weights (at least 1)."""
    if not linears:
        raise ValueError("no target modules to size a sparse adapter for")
    shapes = _shapes(linears)
    per_rank = sum(i + o for i, o in shapes) / sum(i * o for i, o in shapes)
    r = max(1, round(density / per_rank))
    ceiling = max_rank(linears)
    if r > ceiling:
        raise ValueError(
            f"adapter.density {density} needs r={r}, but SHiRA's r * (in + out) entries per "
            f"matrix allow at most r={ceiling} for these target modules (density "
            f"{density_for(linears, ceiling):.4f})"
        )
    return r


def calibration_batches(
    train_set: Sequence[dict[str, list[int]]],
    collate: Callable[[list[dict[str, list[int]]]], dict[str, Any]],
    batch_size: int,
    count: int,
    seed: int,
) -> list[dict[str, Any]]:
    """`count` batches of a seeded shuffle of the training examples (fewer if the data is
    smaller): the same batches on every rank, so every rank chooses the same mask."""
    order = list(range(len(train_set)))
    random.Random(seed).shuffle(order)
    order = order[: count * batch_size]
    return [
        collate([train_set[i] for i in order[start : start + batch_size]])
        for start in range(0, len(order), batch_size)
    ]


def gradient_scores(
    model: Any, linears: dict[str, Any], batches: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Sum over `batches` of |dL/dW| for each target weight (float32, on the weight's
    device); only the target weights take gradients, each batch's is folded in and freed as
    soon as it is complete. The model's requires_grad flags and mode are restored after."""
    import torch

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    scores = {
        path: torch.zeros(module.weight.shape, dtype=torch.float32, device=module.weight.device)
        for path, module in linears.items()
    }
    handles = []
    try:
        model.requires_grad_(False)
        model.eval()  # no dropout: the scores depend on the data and the seed only
        for path, module in linears.items():
            module.weight.requires_grad_(True)

            def fold(param: Any, score: Any = scores[path]) -> None:
                score.add_(param.grad.detach().abs().float())
                param.grad = None

            handles.append(module.weight.register_post_accumulate_grad_hook(fold))
        device = next(iter(linears.values())).weight.device
        for batch in batches:
            inputs = {key: value.to(device) for key, value in batch.items()}
            model(**inputs).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
            parameter.grad = None
        model.train(was_training)
    return scores


def top_k_mask(score: Any, count: int, dtype: Any) -> Any:
    """A 0/1 mask (of `dtype`, on the score's device) of the `count` largest scores."""
    import torch

    mask = torch.zeros(score.numel(), dtype=dtype, device=score.device)
    mask[score.flatten().topk(count).indices] = 1
    return mask.view(score.shape)


def mask_function(scores: dict[str, Any], linears: dict[str, Any]) -> Callable[..., Any]:
    """PEFT's `ShiraConfig.mask_fn`: the top r * (in + out) scores of the layer it is asked
    about (PEFT passes the original nn.Linear, found here by identity)."""
    by_module = {id(module): scores[path] for path, module in linears.items()}
    modules = list(linears.values())  # keeps the ids valid while the function lives

    def mask_fn(base_layer: Any, r: int, **_: Any) -> Any:
        if id(base_layer) not in by_module:
            raise ValueError(f"no selection scores for {base_layer!r}")
        weight = base_layer.weight
        count = budget_count(weight.shape[1], weight.shape[0], r)
        return top_k_mask(by_module[id(base_layer)], count, weight.dtype).to(weight.device)

    mask_fn.modules = modules  # type: ignore[attr-defined]
    return mask_fn


@dataclass
class Selection:
    """What `select` chose: the rank (from `density` when set), PEFT's mask function (None:
    PEFT's seeded random mask) and the record kept in the adapter manifest."""

    method: str
    r: int
    mask_fn: Callable[..., Any] | None
    record: dict[str, Any] = field(default_factory=dict)


def select(
    model: Any, adapter: AdapterSettings, batches: Callable[[], Sequence[dict[str, Any]]]
) -> Selection:
    """Size the budget (`adapter.density`, else `adapter.r`) and score every target matrix of
    `model` (before get_peft_model) for `adapter.selection`; `batches` is called for
    `gradient` only."""
    started = time.perf_counter()
    method = adapter.selection
    linears = target_linears(model, adapter.target_modules)
    if isinstance(adapter.density, float):
        r = rank_for_density(linears, adapter.density)
    elif isinstance(adapter.r, int):
        r = adapter.r
    else:
        raise ValueError("adapter.r 'auto' must be resolved (training/rank_search.py) first")
    record: dict[str, Any] = {
        "selection": method,
        "r": r,
        "density": round(density_for(linears, r), 6),
        "requested_density": adapter.density,
    }
    if method == "random":
        return Selection(method, r, None, {**record, "calibration_s": 0.0})
    if method == "magnitude":
        scores = {path: module.weight.detach().abs().float() for path, module in linears.items()}
    elif method == "gradient":
        calibration = batches()
        scores = gradient_scores(model, linears, calibration)
        record["calibration_batches"] = len(calibration)
        record["calibration_examples"] = sum(len(b["input_ids"]) for b in calibration)
    else:
        raise ValueError(f"unknown sparse selection {method!r}")
    record["calibration_s"] = round(time.perf_counter() - started, 2)
    logger.info(
        "sparse selection %s: r=%d over %d matrices (density %.4f), %.1f s",
        method,
        r,
        len(linears),
        record["density"],
        record["calibration_s"],
    )
    return Selection(method, r, mask_function(scores, linears), record)
