"""Reference inputs (README §3, §7.2) and the ``check-reference`` checker, on CPU.

The checker tests build a tiny reference directory in ``tmp_path`` (its own cases.json, inputs.json,
manifest and safetensors vectors) and register fake runners on a made-up component, so they prove
the PASS/FAIL lines, tolerances and exit codes without any real model.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import shared_dir
from safetensors.torch import save_file

from selva.reference import check, runners
from selva.reference.check import COMPONENTS, RuleCache, check_directory, parse_only, relative_error
from selva.reference.inputs import (
    InputError,
    InputSet,
    InputSpec,
    formula_input,
    literal_input,
    verify_input,
    verify_uni_selfcheck,
)
from selva.reference.weight_rule import rule_tensor, uni

# ---------------------------------------------------------------------------------------------
# Formula inputs against the shared inputs.json


def _input_names() -> list[str]:
    path = shared_dir() / "reference" / "inputs.json"
    if not path.is_file():
        return ["<no reference directory>"]
    return [e["name"] for e in json.loads(path.read_text())["inputs"]]


@pytest.fixture(scope="module")
def ref_inputs(reference_dir: Path) -> InputSet:
    return InputSet(reference_dir)


def test_inputs_json_uni_selfcheck(reference_dir: Path) -> None:
    data = json.loads((reference_dir / "inputs.json").read_text())
    assert verify_uni_selfcheck(data) >= 1


@pytest.mark.parametrize("name", _input_names())
def test_formula_input_matches_inputs_json(ref_inputs: InputSet, name: str) -> None:
    spec = ref_inputs.specs[name]
    assert spec.first4 is not None and spec.sum is not None and spec.sumsq is not None
    tensor = ref_inputs.formula(name)  # verifies first4 / sum / sumsq, raising on a mismatch
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == spec.shape
    # Independent restatement of §3 for the first values: scale * v, then + offset, then cast.
    v = uni(ref_inputs.salt + name, 4)
    assert tensor.reshape(-1)[:4].tolist() == [float(np.float32(spec.offset + spec.scale * x)) for x in v]


def test_verify_input_detects_a_wrong_formula() -> None:
    spec = InputSpec(name="input/x", shape=(3, 5), scale=2.5, offset=-2.5)
    good = formula_input(spec, "s/")
    flat = good.reshape(-1).double()
    stats = InputSpec(
        name=spec.name,
        shape=spec.shape,
        scale=spec.scale,
        offset=spec.offset,
        first4=tuple(flat[:4].tolist()),
        sum=float(flat.sum()),
        sumsq=float((flat * flat).sum()),
    )
    verify_input(stats, good)
    with pytest.raises(InputError, match="first4"):
        verify_input(stats, formula_input(spec, "other-salt/"))
    shifted = good.clone()
    shifted[-1, -1] += 0.25  # first4 unchanged: only the sums can notice
    with pytest.raises(InputError, match="sum"):
        verify_input(stats, shifted)


def test_formula_order_of_operations() -> None:
    spec = InputSpec(name="input/voc_mel", shape=(2, 3), scale=2.5, offset=-2.5)
    v = uni("input/voc_mel", 6)
    expect = ((v * 2.5) + -2.5).astype(np.float32).reshape(2, 3)
    assert torch.equal(formula_input(spec, ""), torch.from_numpy(expect))


def test_uni_selfcheck_failure_is_loud() -> None:
    with pytest.raises(InputError, match="self-check"):
        verify_uni_selfcheck({"uni_selfcheck": {'uni("abc", 2)': [0.0, 0.0]}})
    assert verify_uni_selfcheck({"uni_selfcheck": {"something else": [1.0]}}) == 0


# ---------------------------------------------------------------------------------------------
# Input references


def test_string_reference_casts_float32_values_up(ref_inputs: InputSet) -> None:
    f32 = ref_inputs.resolve("latent", "input/gen_a/latent", torch.float32)
    f64 = ref_inputs.resolve("latent", "input/gen_a/latent", torch.float64)
    assert f32.dtype == torch.float32 and f64.dtype == torch.float64
    assert torch.equal(f64, f32.double())
    f32.zero_()  # a runner scribbling on its input must not affect the next run
    assert torch.equal(ref_inputs.resolve("latent", "input/gen_a/latent", torch.float32), f64.float())


def test_slice_reference(ref_inputs: InputSet) -> None:
    ref = {"name": "input/video", "dim": 1, "start": 0, "stop": 16}
    clip = ref_inputs.resolve("video", ref, torch.float32)
    assert clip.shape == (1, 16, 3, 224, 224) and clip.is_contiguous()
    # Values depend only on the flat index: the 16-frame slice is the start of the 32-frame tensor.
    assert torch.equal(clip.reshape(-1), ref_inputs.formula("input/video").reshape(-1)[: clip.numel()])
    mid = ref_inputs.resolve("video", {"name": "input/video", "dim": 1, "start": 8, "stop": 24}, None)
    assert torch.equal(mid, ref_inputs.formula("input/video")[:, 8:24])
    with pytest.raises(InputError, match="out of range"):
        ref_inputs.resolve("video", {"name": "input/video", "dim": 1, "start": 30, "stop": 40}, None)


def test_file_reference_keeps_stored_dtype(ref_inputs: InputSet) -> None:
    mel = ref_inputs.resolve("mel", {"file": "mel_16k.vectors.safetensors", "key": "mel_f32"}, torch.float64)
    assert mel.dtype == torch.float32 and mel.shape == (1, 80, 62)
    mask = ref_inputs.resolve(
        "m", {"file": "textsynch_depth1_sup5.vectors.safetensors", "key": "seg1_text_mask_with_sup"}, None
    )
    assert mask.dtype == torch.uint8
    with pytest.raises(InputError, match="no tensor"):
        ref_inputs.resolve("mel", {"file": "mel_16k.vectors.safetensors", "key": "nope"}, None)
    with pytest.raises(InputError, match="not found"):
        ref_inputs.resolve("mel", {"file": "missing.safetensors", "key": "mel"}, None)


def test_literal_inputs() -> None:
    mask = literal_input("mask", [[1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]], torch.float64)
    assert mask.dtype == torch.bool and mask.shape == (2, 7) and mask.sum() == 6
    t64 = literal_input("t", [0.6, 0.05], torch.float64)
    assert t64.dtype == torch.float64 and t64.tolist() == [0.6, 0.05]  # the double 0.6, not float32(0.6)
    t32 = literal_input("t", [0.3], torch.float32)
    assert t32.dtype == torch.float32 and t32.shape == (1,)
    with pytest.raises(InputError):
        literal_input("mask", [[1, 2]], None)
    with pytest.raises(InputError):
        literal_input("mask", [[1, 0], [1]], None)
    with pytest.raises(InputError):
        literal_input("t", [0.5], None)
    with pytest.raises(InputError):
        literal_input("video", [1.0], torch.float32)


def test_every_reference_case_resolves(reference_dir: Path, ref_inputs: InputSet) -> None:
    cases = json.loads((reference_dir / "cases.json").read_text())["cases"]
    for case in cases:
        runs = {o["run"] for o in case["outputs"] if "run" in o}
        for run in runs:
            dtype = check.RUN_DTYPES[run]
            resolved = ref_inputs.resolve_all(case.get("inputs") or {}, dtype)
            for role, tensor in resolved.items():
                if role == "mask":
                    assert tensor.dtype == torch.bool
                elif isinstance(case["inputs"][role], dict) and "file" in case["inputs"][role]:
                    assert tensor.dtype == torch.float32  # stored dtype (the VAE's mel_f32)
                else:
                    assert tensor.dtype == dtype, (case["id"], role)


# ---------------------------------------------------------------------------------------------
# The checker, on a tiny temporary reference directory

SALT = "tiny/"
IN_SALT = "tiny-in/"
X_SPEC = InputSpec(name="input/x", shape=(2, 3, 4), scale=2.0, offset=0.5)


def _run(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The toy model: y = x @ w.T (w is the rule weight)."""
    return x @ w.T.to(x.dtype)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    x32 = formula_input(X_SPEC, IN_SALT)
    flat = x32.reshape(-1).double()
    (tmp_path / "inputs.json").write_text(
        json.dumps(
            {
                "salt": IN_SALT,
                "inputs": [
                    {
                        "name": X_SPEC.name,
                        "shape": list(X_SPEC.shape),
                        "scale": X_SPEC.scale,
                        "offset": X_SPEC.offset,
                        "first4": flat[:4].tolist(),
                        "sum": float(flat.sum()),
                        "sumsq": float((flat * flat).sum()),
                    }
                ],
            }
        )
    )
    keys = [
        ["proj.weight", [5, 4], "float32", "parameter"],
        ["proj.bias", [5], "float32", "parameter"],
        ["stats", [5], "float32", "buffer"],
    ]
    (tmp_path / "toy.keys.json").write_text(json.dumps(keys))
    w = rule_tensor("proj.weight", (5, 4), salt=SALT)
    y64 = _run(x32.double(), w)
    y32 = _run(x32, w)
    noisy = y64.clone()
    noisy.view(-1)[0] += 1e-7 * float(torch.linalg.vector_norm(y64))  # relative error exactly ~1e-7
    save_file(
        {
            "y": y64,
            "y_f32": y32,
            "y_noisy": noisy,
            "y_zero": torch.zeros(2, 3, 5, dtype=torch.float64),
            "mask": torch.tensor([[1, 1, 0]], dtype=torch.uint8),
            "wrong_shape": torch.zeros(2, 3, 6, dtype=torch.float64),
        },
        str(tmp_path / "toy.vectors.safetensors"),
    )

    def case(cid: str, call: str, outputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": cid,
            "component": "testcomp",
            "model": "toy",
            "call": call,
            "file": "toy.vectors.safetensors",
            "inputs": {"x": "input/x", "mask": [[1, 1, 0]], "t": [0.25, 0.5]},
            "params": {"k": 3},
            "outputs": outputs,
            **extra,
        }

    def out(value: str, key: str, run: str, tol: float) -> dict[str, Any]:
        return {"value": value, "key": key, "run": run, "tol": tol}

    cases = [
        case(
            "toy/pass",
            "forward",
            [
                out("y", "y", "float64", 1e-12),
                out("y", "y_f32", "float32", 1e-6),
                out("m", "mask", "float64", 0.0),
            ],
        ),
        case(
            "toy/tolerance",
            "forward",
            [
                out("y", "y_noisy", "float64", 1e-6),  # 1e-7 <= 1e-6: pass
                out("y", "y_noisy", "float64", 1e-8),  # 1e-7 > 1e-8: fail
                out("y", "y_noisy", "float64", 0.0),  # tol 0 means bit-equal: fail
                out("zero", "y_zero", "float64", 0.0),  # reference norm 0 and ours 0: pass
                out("y", "y_zero", "float64", 1e-3),  # reference norm 0, ours not: fail (inf)
                out("y", "wrong_shape", "float64", 1.0),  # shape mismatch: fail
                out("absent", "y", "float64", 1.0),  # runner did not return it: fail
                out("y", "no_such_key", "float64", 1.0),  # missing reference key: fail
            ],
        ),
        case("toy/missing", "not_built", [out("y", "y", "float64", 1e-12)]),
        case("toy/raises", "explode", [out("y", "y", "float64", 1e-12), out("y", "y_f32", "float32", 1e-6)]),
        {
            "id": "toy/ints",
            "component": "testcomp",
            "call": "ints",
            "params": {"n": 7},
            "outputs": [{"value": "seven", "expect": 7}, {"value": "eight", "expect": 8}],
        },
    ]
    (tmp_path / "cases.json").write_text(
        json.dumps(
            {
                "format": "selva-reference-cases/1",
                "weight_salt": SALT,
                "inputs": "inputs.json",
                "cases": cases,
            }
        )
    )
    return tmp_path


@pytest.fixture
def fake_runners(monkeypatch: pytest.MonkeyPatch) -> list[runners.CaseContext]:
    """Register runners on the made-up component 'testcomp' only; record every context they get."""
    monkeypatch.setattr(runners, "RUNNER_MODULES", ())  # isolate from the real runner modules
    monkeypatch.setattr(runners, "_RUNNERS", {})
    calls: list[runners.CaseContext] = []

    @runners.register("testcomp", "forward")
    def forward(ctx: runners.CaseContext) -> dict[str, Any]:
        calls.append(ctx)
        sd = ctx.rule_state_dict("toy")
        y = _run(ctx.inputs["x"], sd["proj.weight"])
        return {"y": y, "m": ctx.inputs["mask"], "zero": torch.zeros_like(y)}

    @runners.register("testcomp", "explode")
    def explode(ctx: runners.CaseContext) -> dict[str, Any]:
        raise RuntimeError("boom in the toy runner")

    @runners.register("testcomp", "ints")
    def ints(ctx: runners.CaseContext) -> dict[str, Any]:
        calls.append(ctx)
        return {"seven": ctx.params["n"], "eight": torch.tensor(9)}

    return calls


def _lines(directory: Path, only: set[str] | None = None) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = check_directory(directory, only, out=lines.append)
    return rc, lines


def _find(lines: list[str], *parts: str) -> str:
    hits = [ln for ln in lines if all(p in ln.split() for p in parts)]
    assert len(hits) == 1, (parts, lines)
    return hits[0]


def test_checker_lines_and_exit_code(tiny_dir: Path, fake_runners: list[runners.CaseContext]) -> None:
    rc, lines = _lines(tiny_dir)
    text = "\n".join(lines)
    assert rc == 1, text

    assert _find(lines, "toy/pass", "y", "float64", "y").startswith("PASS")
    assert _find(lines, "toy/pass", "y", "float32", "y_f32").startswith("PASS")
    mask_line = _find(lines, "toy/pass", "m", "float64", "mask")
    assert mask_line.startswith("PASS") and "rel=0.00e+00" in mask_line and "tol=0" in mask_line

    tol_lines = [ln for ln in lines if "toy/tolerance" in ln]
    statuses = [ln.split()[0] for ln in tol_lines]
    assert statuses == ["PASS", "FAIL", "FAIL", "PASS", "FAIL", "FAIL", "FAIL", "FAIL"], text
    assert "tol=1e-06" in tol_lines[0] and "rel=1.0" in tol_lines[0]
    assert "rel=inf" in tol_lines[4]
    assert "shape (2,3,5) != reference (2,3,6)" in tol_lines[5]
    assert "did not return 'absent'" in tol_lines[6]
    assert "no tensor 'no_such_key'" in tol_lines[7]

    missing = [ln for ln in lines if "toy/missing" in ln]
    assert len(missing) == 1 and missing[0].startswith("FAIL") and "no implementation yet" in missing[0]

    # A raising runner fails its outputs but the check goes on to the next case.
    assert any(ln.startswith("ERROR toy/raises float64") and "boom in the toy runner" in ln for ln in lines)
    assert sum(1 for ln in lines if ln.startswith("FAIL toy/raises")) == 2

    assert _find(lines, "toy/ints", "seven").startswith("PASS")
    eight = _find(lines, "toy/ints", "eight")
    assert eight.startswith("FAIL") and "got=9" in eight

    # 3 + 2 + 1 pass; 6 + 1 + 2 + 1 fail.
    assert lines[-1].startswith("6 passed, 10 failed"), lines[-1]


def test_checker_contexts(tiny_dir: Path, fake_runners: list[runners.CaseContext]) -> None:
    _lines(tiny_dir)
    forward = [c for c in fake_runners if c.case["call"] == "forward"]
    # One call per (case, run): toy/pass float64 + float32, toy/tolerance float64.
    assert [(c.case["id"], c.dtype) for c in forward] == [
        ("toy/pass", torch.float64),
        ("toy/pass", torch.float32),
        ("toy/tolerance", torch.float64),
    ]
    first = forward[0]
    assert first.wanted == {"y", "m"} and first.params == {"k": 3}
    assert first.inputs["x"].dtype == torch.float64 and first.inputs["mask"].dtype == torch.bool
    assert first.inputs["t"].dtype == torch.float64 and first.inputs["t"].shape == (2,)
    assert forward[1].inputs["t"].dtype == torch.float32
    sd = first.rule_state_dict("toy")
    assert list(sd) == ["proj.weight", "proj.bias"]  # buffers excluded
    assert torch.equal(sd["proj.weight"], rule_tensor("proj.weight", (5, 4), salt=SALT))  # salted
    ints = [c for c in fake_runners if c.case["call"] == "ints"]
    assert len(ints) == 1 and ints[0].dtype is None and ints[0].inputs == {}


def test_checker_all_pass_returns_zero(tiny_dir: Path, fake_runners: list[runners.CaseContext]) -> None:
    data = json.loads((tiny_dir / "cases.json").read_text())
    data["cases"] = [c for c in data["cases"] if c["id"] == "toy/pass"]
    (tiny_dir / "cases.json").write_text(json.dumps(data))
    rc, lines = _lines(tiny_dir)
    assert rc == 0 and lines[-1].startswith("3 passed, 0 failed"), lines


def test_checker_float32_result_in_float64_run_is_noted(
    tiny_dir: Path, fake_runners: list[runners.CaseContext]
) -> None:
    @runners.register("testcomp", "forward")
    def lazy(ctx: runners.CaseContext) -> dict[str, Any]:
        y = _run(ctx.inputs["x"].float(), ctx.rule_state_dict("toy")["proj.weight"])
        return {"y": y, "m": ctx.inputs["mask"]}

    _, lines = _lines(tiny_dir)
    line = _find(lines, "toy/pass", "y", "float64", "y")
    assert "note: ours is float32 in a float64 run" in line


def test_only_filters_and_validates(tiny_dir: Path, fake_runners: list[runners.CaseContext]) -> None:
    rc, lines = _lines(tiny_dir, {"generator"})
    assert rc == 1 and "nothing checked" in lines[-1]
    rc, lines = _lines(tiny_dir, {"generatr"})
    assert rc == 2 and "generatr" in lines[0] and all(c in lines[0] for c in COMPONENTS)
    assert parse_only(" mel,vae ,") == {"mel", "vae"}
    with pytest.raises(ValueError, match="valid: textsynch, generator"):
        parse_only("mel,bogus")


def test_bad_format_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "cases.json").write_text(json.dumps({"format": "something/2", "cases": []}))
    rc, lines = _lines(tmp_path)
    assert rc == 2 and "selva-reference-cases/1" in lines[0] and "something/2" in lines[0]
    rc, lines = _lines(tmp_path / "nowhere")
    assert rc == 2 and "not a directory" in lines[0]


def test_argparse_wiring(tiny_dir: Path, fake_runners: list[runners.CaseContext], capsys: Any) -> None:
    parser = argparse.ArgumentParser(prog="selva")
    sub = parser.add_subparsers(dest="command")
    check.add_parser(sub)
    args = parser.parse_args(["check-reference", str(tiny_dir), "--only", "mel,vocoder"])
    assert args.only == {"mel", "vocoder"} and args.func is check.run_from_args
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["check-reference", str(tiny_dir), "--only", "mel,bogus"])
    assert exc.value.code == 2
    assert (
        "valid: textsynch, generator, sampler, sequence_config, mel, vae, vocoder" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["check-reference", "--help"])
    help_text = capsys.readouterr().out
    assert "DIR" in help_text and "--only" in help_text and "relative L2" in help_text
    args = parser.parse_args(["check-reference", str(tiny_dir)])
    assert args.func(args) == 1
    assert "6 passed, 10 failed" in capsys.readouterr().out


def test_relative_error() -> None:
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_error(ref.float(), ref) == 0.0
    assert relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == math.inf
    assert math.isnan(relative_error(torch.tensor([float("nan"), 0.0]), ref))


def test_rule_cache_bounds_memory_and_detects_mutation(tmp_path: Path) -> None:
    for model in ("a", "b", "c"):
        (tmp_path / f"{model}.keys.json").write_text(
            json.dumps([["w.weight", [3, 2], "float32", "parameter"]])
        )
    notes: list[str] = []
    cache = RuleCache(tmp_path, "s/", max_models=2, warn=notes.append)
    first = cache("a")
    assert cache("a")["w.weight"] is first["w.weight"]  # reused, not rebuilt
    cache("b")
    cache("c")  # evicts "a", the least recently used
    assert list(cache._models) == ["b", "c"]
    with torch.inference_mode():
        got = cache("c")["w.weight"]
        got.mul_(2.0)  # a misbehaving runner
        fresh = cache("c")["w.weight"]
    assert notes and "in place" in notes[0]
    assert torch.equal(fresh, rule_tensor("w.weight", (3, 2), salt="s/"))
