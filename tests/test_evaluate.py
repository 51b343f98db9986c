"""``selva evaluate`` end to end with a real embedder family: a randomly initialised tiny CLAP
(transformers ``ClapModel``) saved to a local folder with a processor and tokenizer built offline.

Covers: the CLAP score equals a direct ClapModel cosine on the same files; metrics.json names the
weights folder and its hash; the benchmark layout's per-subset and per-placement reports; every
unpaired and unreadable file listed in one error; refused embedders one line each; MLflow (sqlite);
the av-benchmark audio reading; a metric that cannot be computed is one line, the others are kept.
"""

from __future__ import annotations

import csv
import hashlib
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchaudio.functional as AF
from tiny_clap import CLAP_RATE, write_tiny_clap
from tracking_servers import no_mlflow_env

from preprocessing.compact import decode_flac, encode_flac
from selva_cli.main import main
from training.evaluate_data import load_audio

SECONDS = 1.0  # the tiny CLAP's window (1 s: its numpy log-mel is the slow part); --duration below


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory) -> Path:
    return write_tiny_clap(tmp_path_factory.mktemp("clap"))


def _tone(seconds: float, rate: int, hz: float, seed: int, channels: int = 1, dc: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.RandomState(seed)
    wave = 0.3 * np.sin(2 * np.pi * hz * t) + 0.05 * rng.randn(t.size) + dc
    return np.stack([wave * (1 - 0.2 * c) for c in range(channels)]).astype(np.float32)


def _write_flac(path: Path, mono: np.ndarray, rate: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_flac(mono, rate))
    return path


def _write_wav(path: Path, audio: np.ndarray, rate: int) -> Path:
    """(C, N) float -> 16-bit PCM WAV (stereo for C=2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.round(np.clip(audio, -1, 1) * 32767).astype(np.int16)
    with av.open(str(path), mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="stereo" if audio.shape[0] == 2 else "mono")
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16",
                                           layout="stereo" if audio.shape[0] == 2 else "mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _metadata(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


PROMPTS = {"dog": "a dog barks", "cat": "a cat meows", "car": "a car passes by", "bell": "church bells ring"}


def _flat_set(root: Path) -> tuple[Path, Path, Path]:
    gen, ref = root / "gen", root / "ref"
    for i, name in enumerate(PROMPTS):
        _write_flac(gen / f"{name}.flac", _tone(SECONDS, CLAP_RATE, 300 + 100 * i, i)[0], CLAP_RATE)
        _write_flac(ref / f"{name}.flac", _tone(SECONDS, 16_000, 320 + 90 * i, 10 + i)[0], 16_000)
    meta = _metadata(root / "prompts.csv", [{"file_name": f"{n}.mp4", "label": p} for n, p in PROMPTS.items()])
    return gen, ref, meta


def _direct_clap_cosines(folder: Path, files: list[Path], prompts: list[str]) -> np.ndarray:
    """The CLAP score by hand: decode, remove the mean, ClapProcessor + ClapModel, cosine."""
    from transformers import ClapModel, ClapProcessor

    model = ClapModel.from_pretrained(folder, local_files_only=True).eval()
    processor = ClapProcessor.from_pretrained(folder, local_files_only=True)
    waves = []
    for path in files:
        wave, rate = decode_flac(path.read_bytes())
        assert rate == CLAP_RATE
        waves.append(wave - wave.mean())
    with torch.no_grad():
        audio = model.get_audio_features(**processor(audio=waves, sampling_rate=CLAP_RATE, return_tensors="pt",
                                                     truncation="rand_trunc")).pooler_output
        text = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True)).pooler_output
    return torch.nn.functional.cosine_similarity(audio, text, dim=1).numpy()


def _folder_sha256(folder: Path) -> str:
    lines = sorted(f"{p.relative_to(folder).as_posix()}\t{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                   for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def test_clap_score_equals_a_direct_clap_cosine_and_names_its_weights(tmp_path, clap_dir, capsys):
    gen, ref, meta = _flat_set(tmp_path)
    out = tmp_path / "metrics.json"
    code = main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--metadata", str(meta),
                 "--embedders", f"clap={clap_dir}", "--out", str(out), "--duration", str(SECONDS),
                 "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    names = sorted(PROMPTS)
    direct = _direct_clap_cosines(clap_dir, [gen / f"{n}.flac" for n in names], [PROMPTS[n] for n in names])
    per_file = report["per_file"]["LAION-CLAP-Score"]
    np.testing.assert_allclose([per_file[n] for n in names], direct, rtol=1e-5, atol=1e-6)
    score = report["metrics"]["overall"]["LAION-CLAP-Score"]
    assert score["value"] == pytest.approx(float(direct.mean()), rel=1e-5, abs=1e-6)
    assert score["embedder"] == "clap" and score["files"] == 4
    assert score["weights"] == str(clap_dir.resolve()) == report["embedders"]["clap"]["weights"]
    assert score["sha256"] == _folder_sha256(clap_dir) == report["embedders"]["clap"]["sha256"]
    kad = report["metrics"]["overall"]["KAD-CLAP"]
    assert kad["bandwidth_source"] == "median pairwise distance of the reference set" and kad["bandwidth"] > 0
    assert report["layout"] == "flat" and report["pairs"] == 4 and report["errors"] == []
    assert list(report["metrics"]) == ["overall"]  # a flat reference has no subsets or placements
    assert kad["note"].startswith("4 files per set: the unbiased estimate's sampling noise")
    # a clip table (id<TAB>label, as generate --manifest reads) serves as metadata too
    table = tmp_path / "clips.tsv"
    table.write_text("id\tlabel\n" + "".join(f"{n}\t{PROMPTS[n]}\n" for n in names))
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--metadata", str(table),
                 "--embedders", f"clap={clap_dir}", "--out", str(tmp_path / "m2.json"), "--duration", str(SECONDS),
                 "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "m2.json").read_text())["per_file"]["LAION-CLAP-Score"] == per_file
    assert "LAION-CLAP-Score" in capsys.readouterr().out  # the summary table


def _benchmark(root: Path, with_placement: bool, side_in_name: bool = True) -> tuple[Path, Path]:
    """REF/<subset>/{target_audio,mixed,metadata.csv} and GEN/<subset>/<name>.flac; names
    ``<target>_<partner>_<side>`` as the release's, or ``..._<a|b>`` (no side in the name)."""
    ref, gen = root / "bench", root / "gen"
    seed = 0
    for subset in ("intra_class", "inter_class"):
        rows = []
        for target, partner in (("dog", "cat"), ("car", "bell")):
            for side in ("left", "right"):
                name = f"{target}_{partner}_{side if side_in_name else {'left': 'a', 'right': 'b'}[side]}"
                seed += 1
                _write_flac(ref / subset / "target_audio" / f"{name}.flac",
                            _tone(SECONDS, 16_000, 200 + 50 * seed, seed)[0], 16_000)
                _write_flac(gen / subset / f"{name}.flac", _tone(SECONDS, CLAP_RATE, 230 + 50 * seed, 100 + seed)[0],
                            CLAP_RATE)
                (ref / subset / "mixed").mkdir(parents=True, exist_ok=True)
                row = {"file_name": f"{name}.mp4", "label": f"{PROMPTS[target]} {subset[:5]}"}
                if with_placement:
                    row.update(negative=PROMPTS[partner], placement=side)
                rows.append(row)
        _metadata(ref / subset / "metadata.csv", rows)
    return ref, gen


def test_a_benchmark_reference_reports_overall_per_subset_and_per_placement(tmp_path, clap_dir):
    ref, gen = _benchmark(tmp_path, with_placement=True)
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--embedders", f"clap={clap_dir}",
                 "--out", str(out), "--duration", "1", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["layout"] == "benchmark" and report["pairs"] == 8
    assert list(report["metrics"]) == ["overall", "subset/inter_class", "subset/intra_class", "placement/left",
                                       "placement/right"]
    per_file = report["per_file"]["LAION-CLAP-Score"]
    assert sorted(per_file) == sorted(f"{s}/{t}_{p}_{side}" for s in ("intra_class", "inter_class")
                                      for t, p in (("dog", "cat"), ("car", "bell")) for side in ("left", "right"))
    members = {"overall": list(per_file), "subset/intra_class": [k for k in per_file if k.startswith("intra_class/")],
               "subset/inter_class": [k for k in per_file if k.startswith("inter_class/")],
               "placement/left": [k for k in per_file if k.endswith("_left")],
               "placement/right": [k for k in per_file if k.endswith("_right")]}
    for group, keys in members.items():
        entry = report["metrics"][group]["LAION-CLAP-Score"]
        assert entry["files"] == len(keys) == (8 if group == "overall" else 4)
        assert entry["value"] == pytest.approx(np.mean([per_file[k] for k in keys]), rel=1e-9)
        # KAD's bandwidth comes from the group's reference files only
        assert report["metrics"][group]["KAD-CLAP"]["bandwidth"] > 0
    assert report["placement"].startswith("the metadata's placement (or target_position) column")
    # the prompt of each pair is its subset's metadata label: the same audio scored against another
    # subset's label would differ, so check one pair against a direct cosine
    direct = _direct_clap_cosines(clap_dir, [gen / "inter_class" / "dog_cat_left.flac"], ["a dog barks inter"])
    assert per_file["inter_class/dog_cat_left"] == pytest.approx(float(direct[0]), rel=1e-5, abs=1e-6)


def test_an_empty_subset_is_skipped_but_audio_left_in_it_is_a_problem(tmp_path, clap_dir, capsys):
    """``benchmark build`` without a category column writes intra_class/metadata.csv with no rows and no
    target_audio/: evaluate reports the other subset, and names generated audio under the empty one."""
    import shutil

    ref, gen = _benchmark(tmp_path, with_placement=True)
    shutil.rmtree(ref / "intra_class")
    (ref / "intra_class").mkdir()
    (ref / "intra_class" / "metadata.csv").write_text("file_name,label,negative,placement\n")  # as build writes it
    shutil.rmtree(gen / "intra_class")
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--generated", str(gen), "--reference", str(ref), "--embedders", f"clap={clap_dir}",
            "--out", str(out), "--duration", "1", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["pairs"] == 4 and "subset/intra_class" not in report["metrics"]
    stray = _write_flac(gen / "intra_class" / "dog_cat_left.flac", _tone(SECONDS, CLAP_RATE, 300, 1)[0], CLAP_RATE)
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{stray}: not in {ref / 'intra_class' / 'metadata.csv'} (an empty subset)" in err


def test_the_released_layout_takes_placements_from_names_or_says_they_are_unknown(tmp_path, clap_dir):
    ref, gen = _benchmark(tmp_path / "named", with_placement=False)  # file_name,label only; <t>_<p>_<side>
    out = tmp_path / "named.json"
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--embedders", f"clap={clap_dir}",
                 "--out", str(out), "--duration", "1", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert list(report["metrics"])[-2:] == ["placement/left", "placement/right"]
    assert report["metrics"]["placement/left"]["LAION-CLAP-Score"]["files"] == 4

    ref, gen = _benchmark(tmp_path / "plain", with_placement=False, side_in_name=False)
    out = tmp_path / "plain.json"
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--embedders", f"clap={clap_dir}",
                 "--out", str(out), "--duration", "1", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert list(report["metrics"]) == ["overall", "subset/inter_class", "subset/intra_class"]
    assert report["placement"] == "unknown: neither the metadata nor the names give it"


def test_references_named_by_target_clip_serve_both_placements(tmp_path, clap_dir, capsys):
    ref, gen = tmp_path / "bench", tmp_path / "gen"
    rows = []
    for i, (target, partner) in enumerate((("dog", "cat"), ("car", "bell"))):
        _write_flac(ref / "inter_class" / "target_audio" / f"{target}.flac", _tone(SECONDS, 16_000, 300 + 50 * i, i)[0],
                    16_000)
        for side in ("left", "right"):
            _write_flac(gen / "inter_class" / f"{target}_{partner}_{side}.flac",
                        _tone(SECONDS, CLAP_RATE, 330 + 60 * i, 10 + i)[0], CLAP_RATE)
            rows.append({"file_name": f"{target}_{partner}_{side}.mp4", "label": PROMPTS[target], "target": target})
    _metadata(ref / "inter_class" / "metadata.csv", rows)
    (gen / "failures").mkdir()  # selva generate's bookkeeping folder: no audio, not a problem
    (gen / "failures" / "x.json").write_text("{}")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--embedders", f"clap={clap_dir}",
                 "--out", str(out), "--duration", "1", "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["pairs"] == 4 and report["metrics"]["placement/right"]["KAD-CLAP"]["files"] == 2


def test_every_unpaired_and_duplicated_file_is_listed_in_one_error(tmp_path, clap_dir, capsys):
    gen, ref, meta = _flat_set(tmp_path)
    _write_flac(gen / "extra.flac", _tone(1.0, CLAP_RATE, 500, 7)[0], CLAP_RATE)
    _write_flac(gen / "orphan.flac", _tone(1.0, CLAP_RATE, 500, 8)[0], CLAP_RATE)
    (ref / "cat.flac").unlink()
    _write_wav(ref / "dog.wav", _tone(1.0, 16_000, 400, 9, channels=1), 16_000)  # a second file for "dog"
    (gen / "x.mp3").write_bytes(b"ID3")  # audio av-benchmark does not read, and audio below the top level:
    _write_flac(gen / "more" / "deep.flac", _tone(1.0, CLAP_RATE, 500, 6)[0], CLAP_RATE)  # neither is dropped
    out = tmp_path / "metrics.json"
    code = main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--metadata", str(meta),
                 "--embedders", f"clap={clap_dir}", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: 6 file problem(s) between --generated") and "Traceback" not in err
    assert sorted(lines[1:]) == sorted([f"  {ref / 'dog.wav'}: a second file for dog (also dog.flac)",
                                        f"  {gen / 'x.mp3'}: .mp3 is not read (av-benchmark reads .flac and .wav): "
                                        "convert it",
                                        f"  {gen / 'more'}: audio in a subfolder (a flat layout pairs only the files "
                                        f"directly in {gen})",
                                        f"  {gen / 'cat.flac'}: no reference cat",
                                        f"  {gen / 'extra.flac'}: no reference extra",
                                        f"  {gen / 'orphan.flac'}: no reference orphan"])


def test_every_unreadable_file_is_listed_in_one_error(tmp_path, clap_dir, capsys):
    gen, ref, meta = _flat_set(tmp_path)
    (gen / "dog.flac").write_bytes(b"not audio at all")
    (ref / "car.flac").write_bytes((ref / "car.flac").read_bytes()[:40])  # a header and nothing else
    _write_flac(gen / "stray.flac", _tone(1.0, CLAP_RATE, 500, 7)[0], CLAP_RATE)
    (ref / "lost.wav").write_bytes(b"RIFF....WAVE")  # unpaired and unreadable: listed under both
    code = main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--metadata", str(meta),
                 "--embedders", f"clap={clap_dir}", "--out", str(tmp_path / "m.json"), "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines[0].startswith("error: 2 file problem(s) between --generated")
    assert sorted(lines[1:3]) == [f"  {gen / 'stray.flac'}: no reference stray",
                                  f"  {ref / 'lost.wav'}: no generated lost"]
    assert lines[3] == "3 unreadable audio file(s):"
    assert sorted(line.split(": ")[0].strip() for line in lines[4:]) == sorted([str(gen / "dog.flac"),
                                                                                str(ref / "car.flac"),
                                                                                str(ref / "lost.wav")])


def test_missing_prompts_are_listed_before_any_work(tmp_path, clap_dir, capsys):
    gen, ref, _ = _flat_set(tmp_path)
    meta = _metadata(tmp_path / "partial.csv", [{"file_name": "dog.flac", "label": "a dog barks"}])
    assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--metadata", str(meta),
                 "--embedders", f"clap={clap_dir}", "--out", str(tmp_path / "m.json"), "--no-progress"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"error: the CLAP score needs a prompt for every file; 3 have none in --metadata {meta}:"
    assert lines[1:] == ["  bell", "  car", "  cat"]


def test_refused_embedders_are_one_line_each(tmp_path, capsys):
    gen, ref, meta = _flat_set(tmp_path)
    code = main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--out", str(tmp_path / "m.json"),
                 "--embedders", "panns", "vggish", "imagebind", "desync", f"passt={tmp_path / 'none.pt'}", "clap"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and lines[0] == "error: 6 embedder(s) cannot be used:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["panns", "vggish", "imagebind", "desync", "passt",
                                                                   "clap"]
    assert "FD-PANN" in lines[1] and lines[2].startswith("  vggish: no weights given") and "Synchformer" in lines[4]
    assert lines[5] == f"  passt: weights file {tmp_path / 'none.pt'} does not exist"
    assert lines[6].startswith("  clap: no weights given")


def test_mlflow_logs_the_metrics_to_sqlite_next_to_the_output(tmp_path, clap_dir, monkeypatch):
    # creating a new sqlite store (MLflow's schema migrations) takes 5-15 s on 2 busy cores: the
    # 10 s exit deadline is the product's trade-off, not what this test checks
    monkeypatch.setattr("training.evaluate_cli.TRACKING_DEADLINE_S", 120.0)
    gen, ref, meta = _flat_set(tmp_path)
    out = tmp_path / "run" / "metrics.json"
    with no_mlflow_env():
        assert main(["evaluate", "--generated", str(gen), "--reference", str(ref), "--metadata", str(meta),
                     "--embedders", f"clap={clap_dir}", "--out", str(out), "--duration", str(SECONDS),
                     "--no-progress", "--device", "cpu", "--mlflow"]) == 0
    report = json.loads(out.read_text())
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("selva-evaluate").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["overall/LAION-CLAP-Score"] == pytest.approx(
        report["metrics"]["overall"]["LAION-CLAP-Score"]["value"], rel=1e-12)
    assert run.data.metrics["overall/KAD-CLAP"] == pytest.approx(report["metrics"]["overall"]["KAD-CLAP"]["value"],
                                                                 rel=1e-12)
    assert run.data.params["embedder.clap"] == str(clap_dir.resolve()) and run.data.params["pairs"] == "4"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert artifacts == ["metrics.json"]


def test_audio_is_read_the_av_benchmark_way(tmp_path):
    stereo = _tone(1.0, 44_100, 440, 3, channels=2, dc=0.1)
    path = _write_wav(tmp_path / "x.wav", stereo, 44_100)
    pcm = np.round(np.clip(stereo, -1, 1) * 32767) / 32768  # what the file holds, as torchaudio.load scales it
    mono = pcm.mean(axis=0)
    expected = AF.resample(torch.from_numpy((mono - mono.mean()).astype(np.float32)), 44_100, 16_000)[:8000]
    got = load_audio(path, 16_000, 0.5)
    assert got.shape == (8000,) and abs(float(got.mean())) < 1e-3  # DC removed
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    assert load_audio(path, 16_000, 5.0).shape == (16_000,)  # shorter than --duration: not padded


def test_a_metric_that_cannot_be_computed_is_one_line_and_the_others_are_kept():
    from training.embedders import Embeddings, WeightsRef
    from training.evaluate import EmbedderRun, Report, compute_metrics
    from training.evaluate_data import EvalItem, Pairing

    class FakePasst:  # stands in for PaSST's outputs: 768-d vectors and 527 logits
        name, model, sample_rate, batch_size = "passt", "fake", 32_000, 4
        weights = WeightsRef("/w/passt.pt", "ab" * 32)

    rng = np.random.RandomState(0)
    items = [EvalItem(f"f{i}", Path(f"g{i}"), Path(f"r{i}"), None, None, None, None) for i in range(6)]
    run = EmbedderRun(FakePasst(), Embeddings(rng.randn(6, 3), rng.randn(6, 527)),
                      Embeddings(rng.randn(6, 3), rng.randn(6, 527)))
    report = Report(Pairing("flat", items, False, {}), "/g", "/r", 8.0, [run])
    compute_metrics(report)
    overall = report.metrics["overall"]
    assert report.errors == ["ISC-PASST: 6 files are fewer than its 10 splits (each split needs a file) [overall]"] * 2
    isc = overall["ISC-PASST-mean"]
    assert isc["error"].startswith("ISC-PASST: 6 files") and "value" not in isc
    assert overall["FD-PASST"]["value"] > 0 and overall["KL-PASST-softmax"]["value"] > 0
    assert overall["KL-PASST-softmax"]["sha256"] == "ab" * 32 and overall["KAD-PASST"]["files"] == 6
    assert overall["KL-PASST-softmax"]["value"] == pytest.approx(np.mean(list(report.per_file["KL-PASST-softmax"]
                                                                              .values())), rel=1e-12)


def test_files_are_embedded_in_order_in_batches_of_one_length(tmp_path, monkeypatch):
    from training.embedders import Embeddings, WeightsRef
    from training.evaluate import embed_files

    monkeypatch.setattr("training.evaluate.LOAD_WINDOW", 2)  # 4 files in memory at a time

    class Recorder:  # an embedder whose "embedding" is the waveform's length and first sample
        name, model, sample_rate, batch_size = "rec", "recorder", 16_000, 2
        weights = WeightsRef("/w", "0" * 64)
        batches: list[list[int]] = []

        def embed(self, waveforms):
            self.batches.append([w.size for w in waveforms])
            return Embeddings(vectors=np.array([[w.size, w[0]] for w in waveforms], dtype=np.float64))

    seconds = [1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 0.25]
    paths = [_write_flac(tmp_path / f"{i}.flac", _tone(s, 16_000, 300, i)[0], 16_000) for i, s in enumerate(seconds)]
    done = []
    out = embed_files(Recorder(), paths, None, done.append)
    np.testing.assert_array_equal(out.vectors[:, 0], [int(s * 16_000) for s in seconds])
    np.testing.assert_allclose(out.vectors[:, 1], [load_audio(p, 16_000, None)[0] for p in paths], rtol=1e-6)
    assert all(len(set(batch)) == 1 and len(batch) <= 2 for batch in Recorder.batches)
    assert sum(done) == len(paths) and out.logits is None


def test_embedders_resolve_from_default_names_under_weights(tmp_path):
    from training.evaluate_cli import resolve_embedders
    from training.evaluate_data import EvaluationError

    weights = tmp_path / "weights"
    (weights / "laion-clap-htsat-base").mkdir(parents=True)
    with pytest.raises(EvaluationError, match="clap: .* is not a transformers ClapModel folder"):
        resolve_embedders(None, str(weights))
    (weights / "laion-clap-htsat-base" / "config.json").write_text("{}")
    assert resolve_embedders(None, str(weights)) == [("clap", str(weights / "laion-clap-htsat-base"))]
    assert resolve_embedders(["CLAP"], str(weights)) == [("clap", str(weights / "laion-clap-htsat-base"))]
    with pytest.raises(EvaluationError, match=r"holds none of laion-clap-htsat-base, passt-s-f128"):
        resolve_embedders(None, str(tmp_path))
    with pytest.raises(EvaluationError, match=r"^name the embedders"):
        resolve_embedders(None, None)
    with pytest.raises(EvaluationError) as err:
        resolve_embedders(["clap", "clap", "kad"], str(weights))
    assert str(err.value).splitlines()[1:] == ["  clap: given twice",
                                               "  kad: unknown embedder (known: clap, passt, vggish, panns, imagebind, "
                                               "desync)"]
