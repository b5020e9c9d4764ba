"""Loading the base model without its decoder projections (ragtune/models/skeleton.py): what
the compact engine's packed kinds serve from must be what a whole load gives, bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ragtune.config import EngineConfig, ModelConfig, default_home
from ragtune.models import LoadedModel, load_base_model, resolve_model_dir
from ragtune.models.skeleton import projection_weights
from server.engine.kernel_choice import packs_from_checkpoint
from server.engine.runner import CompactRunner
from tests.engine.families import FAMILY_NAMES, save_model_dir
from tests.engine.test_prompt_gemm import first_logits
from tests.engine.test_runner import generate, sequence

PROMPT = [5, 9, 2, 77, 4, 31, 8, 100, 7, 12, 64, 3, 19, 250, 6, 41, 17]


def assert_same_but_projections(whole: LoadedModel, skeleton: LoadedModel) -> None:
    """Every parameter and buffer equal (bits, dtype) but the projections, left on meta."""
    skipped = projection_weights(skeleton.model)
    assert skipped and skipped == projection_weights(whole.model)
    params = dict(skeleton.model.named_parameters(remove_duplicate=False))
    for name, tensor in whole.model.named_parameters(remove_duplicate=False):
        if name in skipped:
            assert params[name].is_meta, name
        else:
            assert params[name].dtype == tensor.dtype, name
            assert torch.equal(params[name], tensor), name
    buffers = dict(skeleton.model.named_buffers())
    for name, tensor in whole.model.named_buffers():
        assert buffers[name].dtype == tensor.dtype, name
        assert torch.equal(buffers[name], tensor), name
    assert skeleton.model.generation_config.to_dict() == whole.model.generation_config.to_dict()
    assert skeleton.quantization == "unloaded"
    assert skeleton.fingerprint == whole.fingerprint


def first_logits_and_tokens(loaded: LoadedModel) -> tuple[torch.Tensor, list[int]]:
    """The engine's defaults (packed weights wherever they run): the prompt's last logits
    and 8 greedy tokens."""
    runner = CompactRunner(loaded, EngineConfig(max_batch_size=2), max_seq_len=128)
    [logits] = first_logits(runner, [PROMPT])
    [tokens] = generate(runner, [sequence(PROMPT)], 8)
    return logits, tokens


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_serves_the_same_bits_without_its_projections(family, tmp_path):
    """Each family's tiny model; Llama's with a tied head and no generation_config.json
    (both derived as a whole load derives them)."""
    save_model_dir(family, tmp_path)
    if family == "llama":
        tie_head_and_drop_generation_config(tmp_path)
    config = ModelConfig(source=str(tmp_path), quantization="none", dtype="bf16")
    whole = load_base_model(config, default_home())
    skeleton = load_base_model(config, default_home(), packs_projections=True)
    assert_same_but_projections(whole, skeleton)
    logits, tokens = first_logits_and_tokens(whole)
    skeleton_logits, skeleton_tokens = first_logits_and_tokens(skeleton)
    assert torch.equal(logits, skeleton_logits)
    assert tokens == skeleton_tokens


def tie_head_and_drop_generation_config(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    config.update(tie_word_embeddings=True, temperature=0.7, top_p=0.9)
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "generation_config.json").unlink()
    [path] = model_dir.glob("*.safetensors")
    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "source", ["bundled", pytest.param("bundled:gemma-3-270m", marks=pytest.mark.slow)]
)
def test_the_bundled_models_without_projections_match_their_nf4_load(source):
    """The server's default pairing: an nf4 whole load (whose packed weights come from the
    checkpoint) against the skeleton; tied heads and the real checkpoint names included."""
    config = ModelConfig(source=source, quantization="nf4")
    whole = load_base_model(config, default_home())
    skeleton = load_base_model(config, default_home(), packs_projections=True)
    assert_same_but_projections(whole, skeleton)
    assert skeleton.model.lm_head.weight is skeleton.model.get_input_embeddings().weight
    logits, tokens = first_logits_and_tokens(whole)
    skeleton_logits, skeleton_tokens = first_logits_and_tokens(skeleton)
    assert torch.equal(logits, skeleton_logits)
    assert tokens == skeleton_tokens


def test_the_server_packs_from_the_checkpoint_only_where_its_engine_does(tmp_path):
    from transformers import GPT2Config

    home = default_home()
    model = ModelConfig(source="bundled", device="cpu")
    assert packs_from_checkpoint(EngineConfig(), model, home) is True
    assert packs_from_checkpoint(EngineConfig(weights="w8a8"), model, home) is True
    assert packs_from_checkpoint(EngineConfig(weights="dense"), model, home) is False
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)  # no compact family
    other = ModelConfig(source=str(tmp_path), device="cpu")
    assert packs_from_checkpoint(EngineConfig(), other, home) is False


def test_a_checkpoint_without_the_models_names_loads_whole(tmp_path, caplog):
    """Names the model does not know (a hand-made checkpoint): no guessing, the whole load."""
    from safetensors.torch import load_file, save_file

    source = resolve_model_dir("bundled", default_home())
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, tmp_path / path.name)
    for path in source.glob("*.safetensors"):
        tensors = {f"renamed.{k}": v for k, v in load_file(path).items()}
        save_file(tensors, tmp_path / path.name)
    config = ModelConfig(source=str(tmp_path), quantization="none", dtype="bf16")
    with caplog.at_level("INFO", logger="ragtune.models.loader"):
        loaded = load_base_model(config, default_home(), packs_projections=True)
    assert loaded.quantization == "none"
    assert "loading the whole model (projections included): the checkpoint lacks" in caplog.text
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_dense_weights_over_unloaded_projections_are_a_clear_error():
    config = ModelConfig(source="bundled")
    skeleton = load_base_model(config, default_home(), packs_projections=True)
    with pytest.raises(ValueError, match=r"was not loaded .* load the whole model"):
        CompactRunner(skeleton, EngineConfig(weights="dense"), max_seq_len=128)


def test_pre_quantized_or_odd_projections_load_whole(tmp_path):
    """Projections the engine could not read as plain matrices (an FP8 or bitsandbytes
    checkpoint, with scales beside them; a shape that is not the layer's) are left to the
    whole load, which knows their format or says what is wrong."""
    from safetensors.torch import load_file, save_file

    from ragtune.models.skeleton import load_without_projections

    save_model_dir("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "fp8"}})
    )
    model, why = load_without_projections(tmp_path, torch.bfloat16, "cpu")
    assert model is None and "pre-quantized" in why
    (tmp_path / "config.json").write_text(json.dumps(config))
    [path] = tmp_path.glob("*.safetensors")
    tensors = load_file(path)
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, path, metadata={"format": "pt"})
    model, why = load_without_projections(tmp_path, torch.bfloat16, "cpu")
    assert model is None and f"{key} is stored as F8_E4M3" in why
    tensors[key] = tensors[key].float()[:, :-1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    model, why = load_without_projections(tmp_path, torch.bfloat16, "cpu")
    assert model is None and "not a plain float matrix" in why
