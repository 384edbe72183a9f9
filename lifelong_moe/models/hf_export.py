"""Write a (grown) HFMoECausalLM back in its family's own format, loadable by plain transformers.

The export is the family's config with the expert count updated and a state dict whose sparse
blocks are rebuilt from the MoELayers: router rows [frozen; trainable] in expert-id order,
``gate_up_proj`` / ``down_proj`` as the transposes of the banks' w1 / w2, the shared expert's
Linears under their original names. ``save_pretrained`` writes it as safetensors from a model
skeleton on the meta device, so no second copy of the weights is allocated (a 7B model is
~14 GB per export). Beside it, ``lifelong_moe_experts.json`` records which experts are frozen
and which experience each came from, for a later run that continues growing
(``model.pretrained=<export dir>``, see ``HFMoECausalLM``).

Why an artifact folder (``hf_export/exp_<i>``) and not an MLflow model: MLflow 3.17's
transformers flavor, given a local checkpoint, needs a pipeline task and a tokenizer (an export
of a byte-level run has none), copies the whole checkpoint into a second local folder before
uploading (another ~14 GB per export of a 7B model), stores it as a LoggedModel outside the
run's artifact tree, and without a model card asks the Hugging Face Hub for the card and the
licence of the model's name (``_fetch_model_card``, ``_write_license_information``): not
offline-safe. The folder is what ``from_pretrained`` reads, downloaded with
``mlflow artifacts download``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lifelong_moe.errors import ConfigError
from lifelong_moe.models.hf_moe import DTYPES, EXPERTS_JSON, HFMoECausalLM, require_transformers

EXPORT_CHOICES = ("none", "hf")
# Config attributes that hold the routed-expert count, by family (transformers' own names).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")


def export_state_dict(model: HFMoECausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The transformers state dict of the grown model, in ``dtype``."""
    out: dict[str, torch.Tensor] = {}
    inside = tuple(f"{spec.path}." for spec in model.block_specs)
    for name, tensor in model.hf.state_dict().items():
        if not name.startswith(inside):
            out[name] = tensor
    for spec in model.block_specs:
        layer = model.hf.get_submodule(spec.path).moe
        e = layer.experts
        w1 = torch.cat([e.w1_frozen, e.w1.detach()]) if e.n_frozen else e.w1.detach()
        w2 = torch.cat([e.w2_frozen, e.w2.detach()]) if e.n_frozen else e.w2.detach()
        out[f"{spec.path}.{spec.router}.weight"] = layer.router.full_weight().detach()
        out[f"{spec.path}.{spec.experts}.gate_up_proj"] = w1.transpose(1, 2)
        out[f"{spec.path}.{spec.experts}.down_proj"] = w2.transpose(1, 2)
        if spec.shared:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                weight = getattr(layer.shared, proj).weight.detach()
                out[f"{spec.path}.{spec.shared}.{proj}.weight"] = weight
        if spec.shared_gate:
            out[f"{spec.path}.{spec.shared_gate}.weight"] = layer.shared.gate.weight.detach()
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def grown_config(model: HFMoECausalLM) -> object:
    """The family config with every expert count set to the layers' (all equal) count."""
    counts = {model.hf.get_submodule(s.path).moe.n_experts for s in model.block_specs}
    if len(counts) != 1:
        raise ValueError(f"export: MoE layers differ in expert count {sorted(counts)}")
    (n_experts,) = counts
    config = copy.deepcopy(model.hf.config)
    for key in EXPERT_COUNT_KEYS:
        if hasattr(config, key):
            setattr(config, key, n_experts)
    return config


def export_hf(
    model: HFMoECausalLM,
    directory: str | Path,
    expert_origin: Sequence[int] | None = None,
    dtype: str | None = None,
    tokenizer: str | None = None,
) -> Path:
    """save_pretrained(directory) in the family's format + the experts JSON; returns the dir.

    ``dtype`` defaults to the dtype the checkpoint was loaded in (``model.export_dtype``).
    ``tokenizer`` says what the caller saved beside the model (data/tokenizer.py's
    ``save_for_transformers``: "AutoTokenizer" files, or "bytes" ids); it goes into the JSON.
    """
    check_export("hf", model)
    tf = require_transformers()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = DTYPES[dtype or model.export_dtype]
    config = grown_config(model)
    config.dtype = torch_dtype
    state = export_state_dict(model, torch_dtype)
    with torch.device("meta"):
        skeleton = tf.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    skeleton.save_pretrained(directory, state_dict=state)
    record = model.expert_record(expert_origin)
    if tokenizer is not None:
        record["tokenizer"] = tokenizer
    (directory / EXPERTS_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def check_export(export: str, model: object) -> None:
    """tracking.export=hf needs a model=hf_moe backbone; refused before any training."""
    if export == "hf" and not isinstance(model, HFMoECausalLM):
        raise ConfigError(
            f"tracking.export=hf with model {type(model).__name__}: expected model=hf_moe "
            "(olmoe, qwen2_moe, mixtral); use tracking.export=none"
        )
    if export == "hf" and model.upcycled_from is not None:
        raise ConfigError(
            f"tracking.export=hf with a model upcycled from dense {model.upcycled_from!r}: its "
            "family has no MoE format to export to (not supported yet); use tracking.export=none"
        )


def export_due(index: int, n_experiences: int, every: int) -> bool:
    """After every ``every``-th experience, and always after the last one."""
    return (index + 1) % every == 0 or index == n_experiences - 1
