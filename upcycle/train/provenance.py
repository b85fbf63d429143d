"""What a run records in run.json about where it started and what it read, beside its options.

`upcycle eval --baseline` credits upcycling only against a dense baseline trained the same way as the MoE
(upcycle.evaluate.provenance compares the two runs' run.json). Options alone cannot show that both runs started
from the same parent or read the same files, so the run writes:

- start: the tensor digest of the model it started from, computed the way `upcycle convert` digests a parent
  (so a dense run's digest equals the parent digest its MoE's upcycle.json records); for an MoE made by upcycle
  convert, that manifest's parent digest and the digest of the weights convert wrote (equal to the start digest
  when the run starts from the fresh conversion, not from an MoE trained before);
- data: how many files were read and the data layer's identity of them (names and sizes: the hash a resume
  checks), with the split's seed, held-out fraction and text field;
- parameters: every parameter role's total size (upcycle.train.freeze.parameter_role), beside run.json's
  `trainable`, so that the parts trained can be compared across an MoE and a dense model.
"""

from __future__ import annotations

from pathlib import Path


def start_record(model: str, allow_pickle: bool = False) -> dict:
    from upcycle.storage.manifest import model_digest, read_manifest

    p = Path(model).expanduser()
    rec: dict = {"model": str(p.resolve()) if p.exists() else str(model),
                 "digest": model_digest(model, allow_pickle=allow_pickle)}
    manifest = read_manifest(p) if p.is_dir() else None
    if manifest is not None:
        rec["upcycle_parent"] = manifest.parent
        rec["upcycle_parent_digest"] = manifest.parent_digest
        rec["converted_weights_digest"] = manifest.weights_digest
    return rec


def data_record(blocks, files: list[str]) -> dict:
    """blocks: the run's upcycle.core.data.PackedBlocks; files: the data files it resolved."""
    state = blocks.state_dict()
    return {"files": len(files), "identity": state["files"], "seed": state["seed"],
            "heldout_fraction": state["heldout_fraction"], "text_field": state["text_field"]}
