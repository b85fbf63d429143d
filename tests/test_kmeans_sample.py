"""upcycle.json names the text the k-means router was computed from: the built-in sample depends on the local
Python's standard library, so two conversions with the same command and --seed can differ across Python versions,
and the manifest must let a user tell."""

from __future__ import annotations

import hashlib
import json
import platform


def test_manifest_records_the_default_kmeans_sample(tiny_parent, tmp_path):
    from upcycle.convert import convert
    from upcycle.convert.router_init import default_files, default_texts

    out = tmp_path / "m"
    convert(tiny_parent("llama"), out, experts=4, top_k=2, verify=False, quiet=True)
    sample = json.loads((out / "upcycle.json").read_text())["router_init_sample"]
    assert sample["source"] == "built-in: the Python standard library"
    assert sample["python"] == platform.python_version()
    assert sample["files"] == [f.name for f in default_files()] and len(sample["files"]) == 8
    joined = "\n\n".join(t for t in default_texts() if t.strip())
    assert sample["text_sha256"] == hashlib.sha256(joined.encode()).hexdigest()
    assert sample["tokens"] == 2048  # MAX_TOKENS of the byte tokenizer's ids: the sample is longer


def test_manifest_records_a_given_kmeans_text(tiny_parent, tmp_path):
    from upcycle.convert import convert

    text = tmp_path / "sample.txt"
    text.write_text("def f(x):\n    return x * 2\n" * 40)
    out = tmp_path / "m"
    convert(tiny_parent("llama"), out, experts=4, top_k=2, verify=False, quiet=True, router_init=f"kmeans:{text}")
    sample = json.loads((out / "upcycle.json").read_text())["router_init_sample"]
    assert sample["source"] == str(text) and "python" not in sample and "files" not in sample
    assert sample["text_sha256"] == hashlib.sha256(text.read_text().encode()).hexdigest()
    # byte tokens (and end-of-text), cut to whole 512-token blocks: what the parent ran and k-means clustered
    assert sample["tokens"] == (len(text.read_text().encode()) + 1) // 512 * 512 == 1024
    # no k-means, no sample
    convert(tiny_parent("llama"), tmp_path / "r", experts=4, top_k=2, verify=False, quiet=True, router_init="random")
    assert "router_init_sample" not in json.loads((tmp_path / "r" / "upcycle.json").read_text())
