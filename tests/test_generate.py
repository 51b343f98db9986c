"""``selva generate`` with a tiny checkpoint from the trainer: files equal to the library call, the
negative prompt, the mp4 (copied or re-encoded picture, lossless track), silent inputs, one-line
errors, ``--manifest`` killed and rerun, and a benchmark from ``selva benchmark build`` through
``generate --manifest`` to ``selva evaluate``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import require_shared
from PIL import Image

from preprocessing.compact import FLAC_SCALE, decode_flac, encode_flac
from selva_cli.main import main
from tests.media_fixtures import make_clip, real_clips_dir, write_colour_clip, write_text_as
from tests.tiny_clap import write_tiny_clap
from tests.train_launch import REPO, job_env
from training.generate import (
    GenerationRequest,
    audio_for_files,
    default_name,
    generate,
    item_seed,
    load_model,
)

STEPS = ["--steps", "4"]


@pytest.fixture(scope="module")
def model(tiny_export):
    return load_model(tiny_export)


def _pcm_of(generated) -> np.ndarray:
    return np.round(audio_for_files(generated.audio)[0].astype(np.float64) * FLAC_SCALE).astype(np.int64)


def _pcm(path: Path) -> np.ndarray:
    audio, rate = decode_flac(path.read_bytes())
    assert rate == 16_000
    return np.round(audio.astype(np.float64) * FLAC_SCALE).astype(np.int64)


def _mp4_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        assert container.streams.audio[0].codec_context.name == "alac"
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
    return np.concatenate(frames).astype(np.int64) >> 16  # ALAC decodes 16-bit samples as s32p


def _video_packets(path: Path, t0: float, t1: float) -> list[bytes]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [bytes(p) for p in container.demux(stream)
                if p.pts is not None and p.size and t0 - 1e-3 <= float(p.pts * p.time_base) < t1 - 1e-3]


def test_a_real_clip_gives_the_library_call_bit_for_bit(tiny_export, model, tmp_path, capsys):
    video = require_shared(real_clips_dir() / "0B4dYTMsgHA_000130.mp4", "the real clips")
    args = ["generate", "--checkpoint", str(tiny_export), "--video", str(video), "--prompt", "a dog  barking",
            "--start", "1.5", "--seed", "7", "--out", str(tmp_path), *STEPS]
    assert main(args) == 0
    name = default_name(video, "a dog barking", 1.5)  # the span is part of the name: other spans, other files
    assert name != default_name(video, "a dog barking") != default_name(video, "a dog barking", 0.0, 2.0)
    flac, mp4, png = (tmp_path / f"{name}.{ext}" for ext in ("flac", "mp4", "png"))
    assert "re-encoded (the span does not start on a keyframe)" in capsys.readouterr().out

    direct = generate(model, GenerationRequest(video, "a dog barking", start=1.5, steps=4, seed=7))
    assert flac.read_bytes() == encode_flac(audio_for_files(direct.audio)[0], 16_000)
    pcm = _pcm(flac)
    assert len(pcm) == 2 * 16_000 and np.abs(pcm).max() > 100  # exactly duration x 16 kHz, not silence
    assert np.array_equal(_mp4_audio(mp4), pcm)  # the mp4's track is the flac's samples
    with av.open(str(video)) as container:  # the span's source frames, re-encoded at their size
        source = container.streams.video[0]
        rate, size = source.average_rate, (source.width, source.height)
    with av.open(str(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.frames == round(2 * rate) and (stream.width, stream.height) == size
    image = Image.open(png)
    assert image.format == "PNG" and image.width > 100
    # a rerun writes the same bytes (bit-exact muxer and encoder settings), re-encoded picture included
    assert main([*args, "--name", "again"]) == 0
    assert (tmp_path / "again.mp4").read_bytes() == mp4.read_bytes()

    # the negative prompt replaces the empty text of the unconditional branch: other audio, same name rule
    assert main([*args, "--negative-prompt", "a man speaking", "--name", "neg"]) == 0
    assert not np.array_equal(_pcm(tmp_path / "neg.flac"), pcm)
    negative = generate(model, GenerationRequest(video, "a dog barking", "a man speaking", 1.5, steps=4, seed=7))
    assert (tmp_path / "neg.flac").read_bytes() == encode_flac(audio_for_files(negative.audio)[0], 16_000)


def test_two_prompts_for_one_video_never_collide():
    names = {default_name("clips/v1.mp4", p) for p in ("a dog", "A dog", "a dog!", "a cat", "a " * 40 + "dog")}
    assert len(names) == 5 and all(n.startswith("v1-") for n in names)


def test_a_copied_picture_is_the_input_span_and_a_video_without_audio_works(tiny_export, tmp_path):
    source = make_clip(tmp_path / "clip.mp4", 3.0, fps=25, size=(96, 64))  # x264 ultrafast: no B-frames
    out = tmp_path / "out"
    assert main(["generate", "--checkpoint", str(tiny_export), "--video", str(source), "--prompt", "a beep",
                 "--name", "copy", "--out", str(out), *STEPS]) == 0
    assert _video_packets(out / "copy.mp4", 0.0, 2.0) == _video_packets(source, 0.0, 2.0)  # 50 packets, unchanged
    assert len(_video_packets(source, 0.0, 2.0)) == 50

    mute = make_clip(tmp_path / "mute.mp4", 2.5, fps=25, size=(96, 64), audio=False)
    assert main(["generate", "--checkpoint", str(tiny_export), "--video", str(mute), "--prompt", "a beep",
                 "--name", "mute", "--out", str(out), *STEPS]) == 0
    mute_pcm = _pcm(out / "mute.flac")
    assert len(mute_pcm) == 32_000 and np.array_equal(_mp4_audio(out / "mute.mp4"), mute_pcm)


def test_bad_inputs_are_one_line_naming_the_file(tiny_export, tmp_path, capsys):
    clip = make_clip(tmp_path / "clip.mp4", 2.5, fps=25, size=(64, 64))
    base = ["generate", "--checkpoint", str(tiny_export), "--out", str(tmp_path / "o"), *STEPS]

    def error(args: list[str], code: int) -> str:
        assert main(base + args) == code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    broken = write_text_as(tmp_path / "broken.mp4")
    assert str(broken) in error(["--video", str(broken), "--prompt", "a dog"], 1)
    assert "--prompt is empty" in error(["--video", str(clip), "--prompt", " \t "], 1)
    assert "at least 16 frames" in error(["--video", str(clip), "--prompt", "a", "--duration", "0.4"], 1)
    too_short = error(["--video", str(clip), "--prompt", "a", "--start", "2.0"], 1)
    assert str(clip) in too_short and "too_short" in too_short
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.flac"))

    # checkpoints of the wrong kind or preset
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    base[2] = str(wrong)
    assert str(wrong) in error(["--video", str(clip), "--prompt", "a"], 2)
    old = tmp_path / "old-export"
    shutil.copytree(tiny_export, old)
    record = json.loads((old / "export.json").read_text())
    del record["encoders"]
    (old / "export.json").write_text(json.dumps(record))
    base[2] = str(old)
    assert "does not say which encoders" in error(["--video", str(clip), "--prompt", "a"], 2)
    record.update(preset="small_16k", encoders=json.loads((tiny_export / "export.json").read_text())["encoders"])
    (old / "export.json").write_text(json.dumps(record))
    line = error(["--video", str(clip), "--prompt", "a"], 1)
    assert str(old / "textsynch.safetensors") in line and "tiny" in line


def _manifest(tmp_path: Path, n: int) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    rows = ["id\tlabel\tstart\tnegative"]
    for i in range(n):
        make_clip(media / f"c{i}.mp4", 2.2, fps=25, size=(64, 64), audio=i % 2 == 0)
        rows.append(f"c{i}\tsound number {i}\t0\t{'a hum' if i == 1 else ''}")
    rows.append("gone\ta missing clip\t0\t")
    table = media / "list.tsv"
    table.write_text("\n".join(rows) + "\n")
    return table


def test_a_killed_manifest_run_finishes_only_what_is_missing(tiny_export, model, tmp_path):
    table = _manifest(tmp_path, 4)
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "selva_cli.main", "generate", "--checkpoint", str(tiny_export), "--manifest",
           str(table), "--out", str(out), "--batch-size", "1", "--seed", "3", *STEPS]
    job = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.flac"))) < 2:
            assert job.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.flac")}
    assert 2 <= len(before) < 4

    rerun = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr  # the missing clip failed, the rest is done
    assert f"generated {4 - len(before)}, already done {len(before)}, failed 1" in rerun.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.flac") if p.name in before} == before
    assert len(list(out.glob("*.flac"))) == 4 and not list(out.rglob("*.tmp"))
    failure = json.loads(next((out / "failures").glob("*.json")).read_text())
    assert failure["kind"] == "missing_file" and "gone.mp4" in failure["message"]
    # an item's sound depends on the run's seed and its name only: one library call in this process gives
    # it (another process may run other thread counts: last float bits, grown by Griffin-Lim to < 2e-3)
    # outputs are named by id; c1's row has the negative prompt "a hum"
    direct = generate(model, GenerationRequest(table.parent / "c1.mp4", "sound number 1", "a hum", steps=4,
                                               seed=item_seed(3, "c1")))
    ours = np.round(audio_for_files(direct.audio)[0].astype(np.float64) * FLAC_SCALE)
    assert np.abs(_pcm(out / "c1.flac") - ours).max() <= 64



def test_ranks_split_the_list_and_batches_do_not_change_the_items(model, tmp_path):
    from training.generate_batch import items_from_table, run_items

    items, rejected = items_from_table(_manifest(tmp_path, 3))
    assert len(items) == 4 and rejected == []
    reports = [run_items(model, items, tmp_path / "two", steps=4, seed=1, batch_size=2, rank=r, world_size=2)
               for r in (0, 1)]
    assert [r.generated for r in reports] == [2, 1] and reports[1].failed == {"missing_file": 1}
    # one line per failed item, its reason said once ("KEY: missing_file: MESSAGE")
    assert len(reports[1].failures) == 1 and reports[1].failures[0].count("missing_file") == 1
    single = run_items(model, items[:3], tmp_path / "one", steps=4, seed=1, batch_size=1)
    assert single.generated == 3
    # the table's negative column reaches the sampler: c1 alone in its batch is the library call with it, bit
    # for bit, and not the call without it (this tiny model's negative prompt moves the samples only slightly)
    assert [i.negative for i in items] == [None, "a hum", None, None]
    with_negative, without = (
        _pcm_of(generate(model, GenerationRequest(items[1].video, "sound number 1", negative, steps=4,
                                                  seed=item_seed(1, "c1"))))
        for negative in ("a hum", None))
    assert np.array_equal(_pcm(tmp_path / "one" / "c1.flac"), with_negative)
    assert not np.array_equal(with_negative, without)
    for item in items[:3]:
        a, b = _pcm(tmp_path / "two" / f"{item.name}.flac"), _pcm(tmp_path / "one" / f"{item.name}.flac")
        # batched matmuls and FFTs round differently in the last bits; Griffin-Lim (the embedded codec) grows
        # that to tens of 16-bit steps (< 2e-3 of full scale), while a batch-dependent result moves thousands
        assert np.abs(a - b).max() <= 64


def test_ray_workers_split_the_list_like_ranks(tiny_export, model, tmp_path, capsys):
    """``--ray-workers 2``: each worker does what rank i of 2 does; the outputs are the items' own."""
    table = _manifest(tmp_path, 2)
    out = tmp_path / "ray"
    args = ["generate", "--checkpoint", str(tiny_export), "--manifest", str(table), "--out", str(out),
            "--ray-workers", "2", "--seed", "4", *STEPS]
    assert main(args) == 1  # the missing clip
    printed = capsys.readouterr()
    assert "2 Ray workers: generated 2, already done 0, failed 1" in printed.out
    assert "missing_file" in printed.err and "gone.mp4" in printed.err
    from training.generate_batch import items_from_table, run_items

    items, _ = items_from_table(table)
    run_items(model, items[:2], tmp_path / "local", steps=4, seed=4, batch_size=8)
    for item in items[:2]:
        ours, theirs = _pcm(out / f"{item.name}.flac"), _pcm(tmp_path / "local" / f"{item.name}.flac")
        assert np.abs(ours - theirs).max() <= 64  # other processes, other thread counts: last bits only
    assert main(args) == 1 and "generated 0, already done 2, failed 1" in capsys.readouterr().out


def test_a_benchmark_is_built_generated_and_evaluated_per_subset_and_placement(tiny_export, model, tmp_path, capsys):
    """The three commands of a benchmark run chained as a user runs them: every composite gets its
    prompt and its partner's label as the negative prompt, lands under its subset, and evaluate
    reports every pair overall, per subset and per placement."""
    from training.benchmark_read import read_benchmark

    clips = {"dog": ("dog barking", "animal", (220, 40, 40), 440.0), "cat": ("cat meowing", "animal", (40, 200, 40),
             1000.0), "cello": ("playing cello", "music", (40, 40, 220), 1700.0),
             "violin": ("playing violin", "music", (230, 220, 40), 2600.0)}  # fmt: skip
    lines = ["id\tlabel\tcategory\tpath"]
    for clip_id, (label, category, rgb, tone) in clips.items():
        write_colour_clip(tmp_path / f"{clip_id}.mp4", rgb, tone, seconds=2.5)
        lines.append(f"{clip_id}\t{label}\t{category}\t{clip_id}.mp4")
    (tmp_path / "clips.tsv").write_text("\n".join(lines) + "\n")
    bench, gen = tmp_path / "bench", tmp_path / "gen"
    assert main(["benchmark", "build", "--clips", str(tmp_path / "clips.tsv"), "--out", str(bench),
                 "--duration", "2", "--frame-size", "32", "--partners", "1"]) == 0
    items = read_benchmark(bench)
    assert len(items) == 16 and {i.subset for i in items} == {"intra_class", "inter_class"}
    assert main(["generate", "--checkpoint", str(tiny_export), "--manifest", str(bench), "--out", str(gen),
                 "--seed", "5", *STEPS]) == 0
    for item in items:
        assert len(_pcm(gen / item.subset / f"{item.name}.flac")) == 2 * 16_000
    one = items[-1]  # an inter_class composite: prompt = its label, negative prompt = the partner's label
    assert one.subset == "inter_class" and one.negative == clips[one.partner][0] != one.label
    direct = generate(model, GenerationRequest(one.video, one.label, one.negative, steps=4,
                                               seed=item_seed(5, f"{one.subset}/{one.name}")))
    ours = np.round(audio_for_files(direct.audio)[0].astype(np.float64) * FLAC_SCALE)
    assert np.abs(_pcm(gen / one.subset / f"{one.name}.flac") - ours).max() <= 64  # batched: last bits only

    clap = write_tiny_clap(tmp_path / "clap")
    report_path = tmp_path / "metrics.json"
    capsys.readouterr()
    assert main(["evaluate", "--generated", str(gen), "--reference", str(bench), "--embedders", f"clap={clap}",
                 "--out", str(report_path), "--duration", "1", "--no-progress", "--device", "cpu"]) == 0
    report = json.loads(report_path.read_text())
    assert report["layout"] == "benchmark" and report["pairs"] == 16
    files = {group: entry["LAION-CLAP-Score"]["files"] for group, entry in report["metrics"].items()}
    assert files == {"overall": 16, "subset/inter_class": 8, "subset/intra_class": 8, "placement/left": 8,
                     "placement/right": 8}
    assert sorted(report["per_file"]["LAION-CLAP-Score"]) == sorted(f"{i.subset}/{i.name}" for i in items)


def test_rows_and_options_that_cannot_run_are_named_and_recorded(tiny_export, tmp_path, capsys, monkeypatch):
    """Every table row becomes an output, a recorded failure or a recorded rejection; options that would be
    ignored or would mix settings in one folder are one line each, before any work."""
    make_clip(tmp_path / "c0.mp4", 2.2, fps=25, size=(64, 64))
    table = tmp_path / "list.tsv"
    table.write_text("id\tlabel\tstart\tduration\n" "c0\ta beep\t0\t\n" "c1\ta beep\t-1\t\n" "c2\ta beep\t0\t0.7\n"
                     "c0\ta hum\t0\t\n" "c3\t \t0\t\n")  # fmt: skip
    out = tmp_path / "gen"
    base = ["generate", "--checkpoint", str(tiny_export), "--out", str(out), *STEPS]
    capsys.readouterr()
    assert main([*base, "--manifest", str(table)]) == 1
    printed = capsys.readouterr()
    assert "generated 1, already done 0, failed 0, rejected rows 4" in printed.out
    rejected = json.loads((out / "failures" / "rejected-rows.json").read_text())["rejected_rows"]
    assert [line.split(": ", 1)[0] for line in rejected] == [
        f"{table} row {n} (line {n + 1})" + (f" id='{i}'" if i else "") for n, i in ((2, "c1"), (3, "c2"), (4, "c0"),
                                                                                      (5, ""))]
    assert "start -1 is not a number of seconds >= 0" in rejected[0] and "multiple of 0.04 s" in rejected[1]
    assert "the id of row 1 again" in rejected[2] and rejected[3].endswith("empty prompt")
    assert [line for line in printed.err.splitlines() if line.startswith("rejected: ")] == [
        f"rejected: {line}" for line in rejected]
    assert sorted(p.name for p in out.glob("*.flac")) == ["c0.flac"]  # named by id

    def one_line(args: list[str], code: int) -> str:
        assert main(args) == code
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    assert "steps 4 -> 2" in one_line([*base[:-1], "2", "--manifest", str(table)], 1)  # a folder keeps its settings
    assert "--duration belong to one --video" in one_line([*base, "--manifest", str(table), "--duration", "2"], 2)
    assert "without folders" in one_line([*base, "--video", str(tmp_path / "c0.mp4"), "--prompt", "a",
                                          "--name", "../up"], 2)
    (tmp_path / "afile").write_text("x")
    assert "is a file" in one_line([*base[:4], str(tmp_path / "afile"), *STEPS, "--manifest", str(table)], 2)
    monkeypatch.setenv("WORLD_SIZE", "0")
    assert "WORLD_SIZE=0" in one_line([*base, "--manifest", str(table)], 1)


def test_an_export_is_generated_with_the_video_features_it_was_trained_on(model, tmp_path):
    """A ``pretrain`` export and the ``text_in_encoder: false`` ablation trained their generator on the
    backbone's text-free features; SELVA's stages on TextSynch's text-conditioned ones. Generation must
    feed each what it trained on (for a pretrain export, the cross blocks and [SUP] tokens are untrained)."""
    import copy
    import dataclasses

    import torch

    from selva.sampling import generate_latents
    from training.generate import GenerationError, trained_with_text_in_encoder

    rules = {"stage: pretrain\n": False, "stage: generator\ntext_in_encoder: false\n": False,
             "stage: generator\ntext_in_encoder: true\n": True, "stage: encoder\n": True}
    for text, expected in rules.items():
        (tmp_path / "config.yaml").write_text(text)
        assert trained_with_text_in_encoder(tmp_path / "config.yaml") is expected, text
    assert trained_with_text_in_encoder(tmp_path / "absent.yaml") is True
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(GenerationError, match="config.yaml: not a training config"):
        trained_with_text_in_encoder(tmp_path / "config.yaml")

    assert model.text_in_encoder is False  # the session's tiny export is a pretrain job (configs/train/tiny.yaml)
    # a pretrain export's TextSynch is untrained, and its zero-initialised cross blocks pass the backbone's
    # features through unchanged (both paths agree); perturbed copies make the two paths differ
    ts, gen = copy.deepcopy(model.textsynch), copy.deepcopy(model.generator)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (*ts.parameters(), *gen.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    video = torch.rand(1, 50, 3, 64, 64) * 2 - 1
    t5 = model.encoders.t5.encode(["red square beeping"])
    clip_text = model.encoders.clip.encode(["red square beeping"]).tokens
    noise = torch.randn(1, gen.seq.latent_seq_len, model.preset.generator.latent_dim)
    args = (ts, gen, video, t5.tokens, t5.mask, clip_text, noise)
    plain = generate_latents(*args, steps=2, text_in_encoder=False)
    with_text = generate_latents(*args, steps=2)
    with torch.inference_mode():
        assert torch.equal(plain.sync, ts.encode_video_without_text(video))
        assert torch.equal(with_text.sync, ts(video, t5.tokens, t5.mask))
    assert not torch.equal(plain.latent, with_text.latent)

    # the model's flag reaches the sampler: the same request through a model flagged otherwise differs
    perturbed = dataclasses.replace(model, textsynch=ts, generator=gen)
    request = GenerationRequest(write_colour_clip(tmp_path / "red.mp4", (230, 40, 40), 400.0, seconds=2.0),
                                "red square beeping", steps=2, seed=3)
    as_trained = generate(perturbed, request).audio
    assert np.array_equal(generate(perturbed, request).audio, as_trained)
    other = generate(dataclasses.replace(perturbed, text_in_encoder=True), request).audio
    assert not np.array_equal(other, as_trained)
