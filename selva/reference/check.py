"""``selva check-reference DIR``: run every case of a reference directory and compare (README §7).

For each case of ``DIR/cases.json`` (in file order) whose component is selected, the runner
registered for ``(component, call)`` is called once per ``run`` dtype with the case's inputs and the
directory's rule weights; every returned value is compared with the stored tensor by relative L2 in
float64 (‖ours − ref‖₂ / ‖ref‖₂ ≤ tol; tol 0 means bit-equal). Integer outputs must equal ``expect``.

Output: one ``PASS``/``FAIL`` line per output, then ``N passed, M failed``. Exit code 0 only when
every selected output passed; 1 when some failed; 2 when the directory cannot be checked at all.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import math
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from selva.reference import runners
from selva.reference.inputs import InputError, InputSet
from selva.reference.weight_rule import rule_state_dict

CASES_FORMAT = "selva-reference-cases/1"
COMPONENTS = ("textsynch", "generator", "sampler", "sequence_config", "mel", "vae", "vocoder")
RUN_DTYPES = {"float32": torch.float32, "float64": torch.float64}
INTEGER_RUN = "exact"
"""Label of the pseudo-run that holds integer (``expect``) outputs; the runner gets dtype None."""

Printer = Callable[[str], None]


class ReferenceFormatError(ValueError):
    """The directory is not a reference directory we can read."""


def parse_only(text: str) -> set[str]:
    """``"generator, mel"`` -> {"generator", "mel"}; unknown names raise with the valid list."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)}; valid: {', '.join(COMPONENTS)}")
    if not names:
        raise ValueError(f"--only needs at least one component; valid: {', '.join(COMPONENTS)}")
    return names


def load_cases(directory: Path) -> dict[str, Any]:
    path = directory / "cases.json"
    if not directory.is_dir():
        raise ReferenceFormatError(f"{directory} is not a directory")
    if not path.is_file():
        raise ReferenceFormatError(f"{directory} has no cases.json; is it a reference directory?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReferenceFormatError(f"{path} is not valid JSON: {err}") from err
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt != CASES_FORMAT:
        raise ReferenceFormatError(f"{path}: format is {fmt!r}, this checker reads {CASES_FORMAT!r}")
    if not isinstance(data.get("cases"), list):
        raise ReferenceFormatError(f"{path}: 'cases' must be a list")
    return data


class RuleCache:
    """Rule state dicts by model for one directory, keeping only the most recent few models.

    The same model serves many cases, and building it takes a second or two per 100 M parameters,
    but two models of ~150 M float32 parameters already take over 1 GB, hence the small bound.
    Runners must treat the tensors as read-only; an in-place change is detected through the
    tensors' version counters and the model is rebuilt rather than handing out altered weights.
    """

    def __init__(self, directory: Path, salt: str, max_models: int = 2, warn: Printer | None = None):
        self.directory = directory
        self.salt = salt
        self.max_models = max_models
        self.warn = warn
        self._models: OrderedDict[str, tuple[dict[str, torch.Tensor], dict[str, int]]] = OrderedDict()

    def __call__(self, model: str) -> dict[str, torch.Tensor]:
        entry = self._models.get(model)
        if entry is not None:
            tensors, versions = entry
            if any(t._version != versions[name] for name, t in tensors.items()):
                if self.warn is not None:
                    self.warn(
                        f"note: a runner modified the rule weights of {model} in place; rebuilding them"
                    )
                del self._models[model]
                entry = None
        if entry is None:
            while len(self._models) >= self.max_models:
                self._models.popitem(last=False)
                gc.collect()
            # Built outside inference mode: inference tensors carry no version counter.
            with torch.inference_mode(False):
                tensors = rule_state_dict(self.directory, model, self.salt)
            entry = (tensors, {name: t._version for name, t in tensors.items()})
            self._models[model] = entry
        self._models.move_to_end(model)
        return dict(entry[0])  # a new dict: a runner may pop or rename keys freely


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖₂ / ‖ref‖₂ in float64; 0/0 is 0 and x/0 is inf."""
    a = ours.detach().to(device="cpu", dtype=torch.float64)
    b = ref.detach().to(device="cpu", dtype=torch.float64)
    diff = float(torch.linalg.vector_norm(a - b))
    norm = float(torch.linalg.vector_norm(b))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def _exactly_equal(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    # Compared as float64 so that a bool mask equals its stored uint8 copy.
    a = ours.detach().to(device="cpu", dtype=torch.float64)
    b = ref.detach().to(device="cpu", dtype=torch.float64)
    return bool(torch.equal(a, b))


def _shape(t: torch.Tensor) -> str:
    return "(" + ",".join(str(s) for s in t.shape) + ")"


class _Tally:
    def __init__(self, out: Printer):
        self.out = out
        self.passed = 0
        self.failed = 0

    def line(self, ok: bool, case_id: str, value: str, run: str, key: str, detail: str) -> None:
        self.passed += ok
        self.failed += not ok
        self.out(f"{'PASS' if ok else 'FAIL'} {case_id:<26} {value:<24} {run:<7} {key:<34} {detail}")


def _error_text(err: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame, enough to find where a runner broke."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0] if message else ''}{where}"


def _group_outputs(outputs: list[dict[str, Any]]) -> OrderedDict[str, list[dict[str, Any]]]:
    """Outputs by run, in order of first appearance; integer outputs form their own group."""
    groups: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    for output in outputs:
        run = INTEGER_RUN if "expect" in output else str(output.get("run"))
        groups.setdefault(run, []).append(output)
    return groups


def _check_tensor(
    tally: _Tally, case_id: str, run: str, output: dict[str, Any], ours: Any, ref_file: Path | None
) -> None:
    value, key = str(output.get("value")), str(output.get("key"))
    report = lambda ok, detail: tally.line(ok, case_id, value, run, key, detail)
    try:
        tol = float(output["tol"])
    except (KeyError, TypeError, ValueError):
        report(False, f"malformed output entry (no numeric tol): {output!r}")
        return
    if ref_file is None:
        report(False, "the case names no 'file' for its tensors")
        return
    try:
        from safetensors import safe_open

        with safe_open(str(ref_file), framework="pt") as handle:
            if key not in handle.keys():
                report(False, f"{ref_file.name} has no tensor {key!r}")
                return
            ref = handle.get_tensor(key)
    except Exception as err:  # noqa: BLE001 - a broken file fails this output, not the whole check
        report(False, f"cannot read {ref_file.name}: {_error_text(err)}")
        return
    if not isinstance(ours, torch.Tensor):
        try:
            ours = torch.as_tensor(ours)
        except Exception:  # noqa: BLE001
            report(False, f"runner returned a {type(ours).__name__}, not a tensor")
            return
    if tuple(ours.shape) != tuple(ref.shape):
        report(False, f"rel=     n/a tol={tol:g}  shape {_shape(ours)} != reference {_shape(ref)}")
        return
    err = relative_error(ours, ref)
    # tol 0 asks for bit-equality; tested directly, since a tiny difference can underflow the norm.
    ok = _exactly_equal(ours, ref) if tol == 0.0 else err <= tol  # err <= tol is False for NaN
    detail = f"rel={err:.2e} tol={tol:g}"
    want = RUN_DTYPES.get(run)
    if ours.is_floating_point() and want is not None and ours.dtype != want:
        detail += f"  (note: ours is {str(ours.dtype).removeprefix('torch.')} in a {run} run)"
    report(ok, detail)


def _check_integer(tally: _Tally, case_id: str, output: dict[str, Any], ours: Any) -> None:
    value, expect = str(output.get("value")), output.get("expect")
    if isinstance(ours, torch.Tensor) and ours.numel() == 1:
        ours = ours.item()
    ok = isinstance(ours, int | float) and not isinstance(ours, bool) and ours == expect
    if isinstance(ours, float) and ok and not float(ours).is_integer():
        ok = False
    tally.line(ok, case_id, value, INTEGER_RUN, "-", f"got={ours!r} expect={expect!r}")


def _fail_all(tally: _Tally, case_id: str, run: str, outputs: Iterable[dict[str, Any]], why: str) -> None:
    for output in outputs:
        key = "-" if "expect" in output else str(output.get("key"))
        tally.line(False, case_id, str(output.get("value")), run, key, why)


def _run_case(
    case: dict[str, Any],
    directory: Path,
    inputs: InputSet,
    rules: RuleCache,
    salt: str,
    tally: _Tally,
    show_traceback: bool,
) -> None:
    case_id = str(case.get("id", "?"))
    outputs = case.get("outputs")
    component, call = case.get("component"), case.get("call")
    if not isinstance(outputs, list) or not outputs:
        tally.line(False, case_id, "-", "-", "-", "malformed case: no outputs")
        return
    groups = _group_outputs(outputs)
    try:
        runner = runners.get_runner(str(component), str(call))
    except Exception as err:  # noqa: BLE001 - a broken runner module fails its cases, not the check
        for run, outs in groups.items():
            _fail_all(tally, case_id, run, outs, f"cannot load runners: {_error_text(err)}")
        return
    if runner is None:
        tally.out(
            f"FAIL {case_id:<26} {component}/{call} has no implementation yet "
            f"({len(outputs)} outputs counted as failed)"
        )
        tally.failed += len(outputs)
        return
    ref_file = directory / str(case["file"]) if "file" in case else None
    model = case.get("model")

    for run, outs in groups.items():
        if run == INTEGER_RUN:
            dtype = None
        elif run in RUN_DTYPES:
            dtype = RUN_DTYPES[run]
        else:
            _fail_all(tally, case_id, run, outs, f"unknown run {run!r} (expected float32 or float64)")
            continue
        try:
            resolved = inputs.resolve_all(case.get("inputs") or {}, dtype)
        except (InputError, OSError) as err:
            _fail_all(tally, case_id, run, outs, f"input error: {err}")
            continue

        def model_rules(name: str | None = None) -> dict[str, torch.Tensor]:
            name = name if name is not None else model
            if not name:
                raise ValueError(f"case {case_id} names no model, so it has no rule weights")
            return rules(str(name))

        ctx = runners.CaseContext(
            case=case,
            dtype=dtype,
            inputs=resolved,
            params=dict(case.get("params") or {}),
            wanted={str(o.get("value")) for o in outs},
            rule_state_dict=model_rules,
            directory=str(directory),
            extra={"run": run, "weight_salt": salt},
        )
        try:
            result = runner(ctx)
            if not isinstance(result, dict):
                raise TypeError(f"runner returned {type(result).__name__}, expected a dict of values")
        except Exception as err:  # noqa: BLE001 - reported, then the check goes on
            tally.out(f"ERROR {case_id} {run}: {component}/{call} raised {_error_text(err)}")
            if show_traceback:
                tally.out("".join(traceback.format_exception(err)).rstrip())
            _fail_all(tally, case_id, run, outs, "runner raised an error (see above)")
            continue
        for output in outs:
            value = str(output.get("value"))
            if value not in result:
                key = "-" if run == INTEGER_RUN else str(output.get("key"))
                tally.line(False, case_id, value, run, key, f"runner did not return {value!r}")
            elif run == INTEGER_RUN:
                _check_integer(tally, case_id, output, result[value])
            else:
                _check_tensor(tally, case_id, run, output, result[value], ref_file)
        del result, ctx, resolved


def check_directory(
    directory: str | Path,
    only: set[str] | None = None,
    out: Printer = print,
    *,
    show_traceback: bool = False,
    case_patterns: list[str] | None = None,
) -> int:
    """Run the selected cases of ``directory``; print one line per output; return the exit code.

    ``only`` restricts the check to these components, ``case_patterns`` to the cases whose id matches
    one of these shell-style patterns (``generator/small44_*``). ``show_traceback`` prints a runner's
    full traceback after its one-line error.
    """
    directory = Path(directory)
    if only is not None:
        unknown = sorted(set(only) - set(COMPONENTS))
        if unknown:
            out(f"error: unknown component(s) {', '.join(unknown)}; valid: {', '.join(COMPONENTS)}")
            return 2
    try:
        data = load_cases(directory)
        inputs = InputSet(directory, str(data.get("inputs", "inputs.json")))
    except (ReferenceFormatError, InputError) as err:
        out(f"error: {err}")
        return 2
    salt = str(data.get("weight_salt", ""))
    cases = [c for c in data["cases"] if only is None or (isinstance(c, dict) and c.get("component") in only)]
    if case_patterns is not None:
        if not case_patterns:
            out("error: --cases needs at least one pattern (e.g. 'generator/small44_*')")
            return 2
        idle = [p for p in case_patterns if not any(fnmatch.fnmatchcase(str(c.get("id")), p) for c in cases
                                                    if isinstance(c, dict))]
        if idle:  # a typo would otherwise silently check less than asked
            out(f"error: --cases pattern(s) {', '.join(map(repr, idle))} match no selected case of {directory}")
            return 1
        cases = [c for c in cases if isinstance(c, dict)
                 and any(fnmatch.fnmatchcase(str(c.get("id")), pattern) for pattern in case_patterns)]
    out(
        f"checking {directory}: {len(cases)} of {len(data['cases'])} cases, weight salt {salt!r}, "
        f"input salt {inputs.salt!r}"
    )
    if not cases:
        out("error: no case selected, nothing checked")
        return 1

    tally = _Tally(out)
    rules = RuleCache(directory, salt, warn=out)
    start = time.perf_counter()
    with torch.inference_mode():
        for case in cases:
            if not isinstance(case, dict):
                tally.line(False, "?", "-", "-", "-", f"malformed case entry: {case!r}")
                continue
            _run_case(case, directory, inputs, rules, salt, tally, show_traceback)
            gc.collect()  # free the case's modules before the next one is built
    out(f"{tally.passed} passed, {tally.failed} failed ({time.perf_counter() - start:.1f} s)")
    return 0 if tally.failed == 0 and tally.passed > 0 else 1


def _only_arg(text: str) -> set[str]:
    try:
        return parse_only(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def run_from_args(args: argparse.Namespace) -> int:
    patterns = None if args.cases is None else [p.strip() for p in args.cases.split(",") if p.strip()]
    return check_directory(args.directory, args.only, show_traceback=args.traceback, case_patterns=patterns)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``check-reference`` subcommand; its ``func`` default returns the exit code."""
    parser = subparsers.add_parser(
        "check-reference",
        help="check our modules against an official reference-vector directory",
        description=(
            "Prove weight and numerical compatibility with the official SelVA release. DIR is a "
            "reference directory (cases.json, inputs.json, <model>.keys.json manifests and "
            "safetensors vectors). Every parameter gets the directory's deterministic rule weights "
            "and every input its formula values, each case is run through our implementation in "
            "float32 and/or float64, and each output is compared with the stored official result "
            "by relative L2 error against the tolerance in cases.json. Prints one PASS/FAIL line "
            "per output and a summary; exits 0 only when every checked output passes."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"components: {', '.join(COMPONENTS)}",
    )
    parser.add_argument("directory", metavar="DIR", help="the reference directory to check")
    parser.add_argument(
        "--only",
        type=_only_arg,
        default=None,
        metavar="C1,C2",
        help="check only these components (comma-separated): " + ", ".join(COMPONENTS),
    )
    parser.add_argument(
        "--cases",
        default=None,
        metavar="GLOB1,GLOB2",
        help="check only the cases whose id matches one of these shell patterns, e.g. 'generator/small44_*'",
    )
    parser.add_argument(
        "--traceback", action="store_true", help="print the full traceback when a runner raises"
    )
    parser.set_defaults(func=run_from_args)
    return parser
