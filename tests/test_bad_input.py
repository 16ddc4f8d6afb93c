"""Every bad input through the real ``diffpo`` command: a one-line ``error: ...`` naming the thing
and the fix, a non-zero exit code and no traceback (table-driven, one row per bad input); images
that are only unusual (grayscale, RGBA, CMYK, 16-bit, huge) train after conversion; bad samples
are skipped, counted and listed, or fatal on request; ``diffpo data check`` lists every problem.

Rows run ``diffpo.cli.main`` in-process (seconds in all); two subprocess tests show the real
process prints no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_pairs
from diffpo.cli import main

TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "diffusion_dpo" / "tiny.yaml")
EVAL_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "eval" / "tiny.yaml")


# ---- bad images and datasets, built in code ---------------------------------------------------


def png(colour=(200, 30, 30), size=(32, 32), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(size=(32, 32), colour=(30, 200, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_16bit(value=40000, size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full(size, value, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 4x4 PNG whose header claims ``width`` x ``height`` (with a valid CRC): a decompression bomb's shape."""
    data = bytearray(png(size=(4, 4)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def good_rows(count: int, seed: int = 0) -> list[dict]:
    from diffpo.data.images import encode_png

    return [{"jpg_0": encode_png(p["image_0"]), "jpg_1": encode_png(p["image_1"]), "label_0": p["label_0"],
             "caption": p["caption"]} for p in make_pairs(count, seed=seed)]


def write_rows(path: Path, rows: list[dict], columns=None) -> str:
    """A Pick-a-Pic-format parquet of raw rows; captions become a binary column when any is bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = columns or (list(rows[0]) if rows else ["jpg_0", "jpg_1", "label_0", "caption"])
    data = {c: [r.get(c) for r in rows] for c in columns}
    if any(isinstance(v, bytes) for v in data.get("caption", [])):
        data["caption"] = [v if isinstance(v, bytes) or v is None else v.encode() for v in data["caption"]]
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({c: pa.array(v, type=types.get(c)) for c, v in data.items()}), path)
    return str(path)


def with_row(tmp_path: Path, **row) -> str:
    """8 good pairs and one more row (its missing keys taken from a good pair)."""
    rows = good_rows(9)
    rows[8].update(row)
    return write_rows(tmp_path / "data" / "pairs.parquet", rows)


# ---- running the command ----------------------------------------------------------------------


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


class Ctx:
    """What a row builds its input from: a temporary folder, the tiny model, a good dataset."""

    def __init__(self, tmp_path: Path, tiny: str, good: str):
        self.tmp, self.tiny, self.good = tmp_path, tiny, good

    def train(self, *overrides, data=None, **kw) -> list:
        base = [f"model.pretrained={kw.get('model', self.tiny)}", f"data.source={data or self.good}",
                f"output_dir={kw.get('out', self.tmp / 'run')}", "max_steps=1", "train_batch_size=4",
                "progress_bar=false"]
        return ["train", TINY_CONFIG, *base, *overrides]

    def strict(self, *overrides, data) -> list:
        return self.train("data.skip_bad_samples=false", *overrides, data=data)

    def model_copy(self, name="model-b") -> str:
        target = self.tmp / name
        shutil.copytree(self.tiny, target)
        return str(target)


@pytest.fixture
def ctx(tmp_path, tiny_sd_dir, shapes_parquet):
    return Ctx(tmp_path, tiny_sd_dir, shapes_parquet)


# ---- rows: (id, build the argv from ctx, substrings the one error line must hold) --------------


def _jsonl(c: Ctx, lines: list[bytes]) -> str:
    path = c.tmp / "data" / "manifest.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    (c.tmp / "data" / "a.png").write_bytes(png())
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


GOOD_LINE = b'{"jpg_0": "a.png", "jpg_1": "a.png", "label_0": 1, "caption": "a red circle"}'


def _scheduler_prediction_type(c: Ctx, value: str) -> str:
    model = c.model_copy()
    path = Path(model) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = value
    path.write_text(json.dumps(config))
    return model


def _stale_cache(c: Ctx) -> list:
    code, _, err = run_cli("cache", TINY_CONFIG, f"model.pretrained={c.tiny}", f"data.source={c.good}",
                           f"cache.dir={c.tmp / 'cache'}")
    assert code == 0, err[-2000:]
    (folder,) = (c.tmp / "cache").iterdir()
    return c.train("cache.enabled=true", f"cache.dir={folder}", model=c.model_copy())


def _resume_other_config(c: Ctx) -> list:
    code, _, err = run_cli(*c.train(out=c.tmp / "first"))
    assert code == 0, err[-2000:]
    return c.train(f"resume_from={c.tmp / 'first' / 'checkpoints' / 'step-1'}", "lora.rank=4", "max_steps=2")


def _clip_manifest(c: Ctx, broken: bool = False) -> Path:
    """A GIF manifest of 4-frame moving-shape clips; row 3's winner has only 3 frames (``broken``:
    row 1's loser is no video at all)."""
    from diffpo.data.moving_shapes import sample_moving_shapes
    from diffpo.data.videos import encode_gif

    folder = c.tmp / "clips"
    folder.mkdir()
    lines = []
    for row, (frames, caption) in enumerate(sample_moving_shapes(4, size=32, frames=4)):
        (folder / f"{row}.gif").write_bytes(encode_gif(frames[:3] if row == 3 else frames))
        loser = "broken.gif" if broken and row == 1 else f"{(row + 1) % 3}.gif"
        lines.append(json.dumps({"video_0": f"{row}.gif", "video_1": loser, "label_0": 1, "caption": caption}))
    (folder / "broken.gif").write_bytes(b"GIF89a but nothing after")
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


VIDEO_COLUMNS = ("data.num_frames=4", "data.image_0_column=video_0", "data.image_1_column=video_1")


def _short_clip(c: Ctx) -> list:
    """The bundled video model on clips of which one is too short for data.num_frames."""
    return c.train("data.skip_bad_samples=false", *VIDEO_COLUMNS, data=_clip_manifest(c), model="tiny-video")


def _empty_parquet(c: Ctx) -> str:
    return write_rows(c.tmp / "data" / "empty.parquet", [])


def _garbage_parquet(c: Ctx) -> str:
    path = c.tmp / "data" / "broken.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1 this is not a parquet file")
    return str(path)


def _run_dir(c: Ctx) -> Path:
    run = c.tmp / "finished"
    run.mkdir()
    (run / "config.yaml").write_text("max_steps: 1\n")
    return run


def _under_a_file(c: Ctx) -> list:
    (c.tmp / "afile").write_text("x")
    return c.train(out=c.tmp / "afile" / "run")


def _read_only(c: Ctx) -> list:
    folder = c.tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return c.train(out=folder / "run")


def _column_of(c: Ctx, name: str, values: list) -> str:
    """8 good pairs whose column ``name`` holds ``values`` (a whole column of another type)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = good_rows(8)
    table = {k: [r[k] for r in rows] for k in rows[0]}
    table[name] = values
    path = c.tmp / "typed" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=pa.binary() if k.startswith("jpg") else None) for k, v in table.items()}), path)
    return str(path)


def _twice(c: Ctx) -> Path:
    path = c.tmp / "twice.yaml"
    path.write_text("max_steps: 3\nmax_steps: 5\n")
    return path


def _binary_yaml(c: Ctx) -> list:
    path = c.tmp / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    return ["train", path]


def _resume_past_max_steps(c: Ctx) -> list:
    code, _, err = run_cli(*c.train("max_steps=2"))
    assert code == 0, err[-2000:]
    return c.train("resume_from=latest", "max_steps=1")


ROWS = [
    # configuration
    ("unknown key, nested", lambda c: c.train("optim.learning_rate=1e-5"), ["'optim.learning_rate'", "did you mean 'lr'"]),
    ("misspelled key", lambda c: c.train("max_step=3"), ["'max_step'", "did you mean 'max_steps'"]),
    ("wrong type int", lambda c: c.train("max_steps=ten"), ["max_steps must be an integer", "'ten'"]),
    ("wrong type bool", lambda c: c.train("data.keep_ties=maybe"), ["data.keep_ties must be true or false"]),
    ("beta zero", lambda c: c.train("objective.beta=0"), ["objective.beta=0.0 must be > 0"]),
    ("beta negative", lambda c: c.train("objective.beta=-5"), ["objective.beta=-5.0 must be > 0"]),
    ("lr negative", lambda c: c.train("optim.lr=-1e-4"), ["optim.lr=-0.0001 must be >= 0"]),
    ("lr NaN", lambda c: c.train("optim.lr=nan"), ["optim.lr=nan must be a finite number (>= 0)"]),
    ("lr inf", lambda c: c.train("optim.lr=.inf"), ["optim.lr=inf must be a finite number (>= 0)"]),
    ("beta NaN", lambda c: c.train("objective.beta=.nan"), ["objective.beta=nan must be a finite number (> 0)"]),
    ("beta inf", lambda c: c.train("objective.beta=inf"), ["objective.beta=inf must be a finite number (> 0)"]),
    ("max_grad_norm negative", lambda c: c.train("optim.max_grad_norm=-1"),
     ["optim.max_grad_norm=-1.0 must be > 0", "null turns clipping off"]),
    ("adam_beta1 above 1", lambda c: c.train("optim.adam_beta1=1.5"), ["optim.adam_beta1=1.5 must lie in [0, 1)"]),
    ("checkpoint_every negative", lambda c: c.train("checkpoint_every=-1"), ["checkpoint_every=-1 must be >= 0"]),
    ("max_pairs zero", lambda c: c.train("data.max_pairs=0"), ["data.max_pairs=0 must be >= 1", "null uses every pair"]),
    ("resolution far too large for the memory", lambda c: c.train("data.resolution=1000000"),
     ["data.resolution=1000000 with train_batch_size=4 needs at least", "PB of memory", "lower data.resolution",
      "check_memory=false"]),
    ("config file is a folder", lambda c: ["train", c.tmp], ["is a folder, not a YAML file"]),
    ("config file is a run dir", lambda c: ["train", _run_dir(c)], ["is a folder, not a YAML file: pass", "config.yaml"]),
    ("config file is a device", lambda c: ["train", "/dev/zero"], ["'/dev/zero' is not a regular file"]),
    ("config file is binary", _binary_yaml, ["weights.yaml' is not a text YAML file (byte 0x80 at position 128"]),
    ("empty output_dir", lambda c: c.train(out=""), ["output_dir is empty: name a folder for the run"]),
    ("a key twice in the YAML", lambda c: ["train", _twice(c)], ["key 'max_steps' appears twice in one section (lines 1 and 2)"]),
    ("lora.target_modules that match nothing", lambda c: c.train("lora.target_modules=[to_qq]"),
     ["lora.target_modules=['to_qq']", "not found in the base model", "e.g. [to_q, to_k, to_v, to_out.0]"]),
    ("online.prompts file missing", lambda c: c.train("method=d3po", f"online.prompts={c.tmp / 'none.txt'}"),
     ["online.prompts: prompt file", "none.txt' not found", "!prompts.source"]),
    ("unusable cache.dir", lambda c: ["cache", TINY_CONFIG, f"model.pretrained={c.tiny}", f"data.source={c.good}",
                                      "cache.dir=/dev/null"], ["cache.dir='/dev/null': '/dev/null' is a file, not a folder"]),
    ("unknown reward option", lambda c: ["score", "--pairs", c.good, "--reward", "jpeg-compressibility",
                                         "--reward-option", "jpeg-compressibility.qualty=90", "--out", c.tmp / "s.parquet"],
     ["reward 'jpeg-compressibility' has no option 'qualty'; did you mean 'quality'?"]),
    ("eval output_dir is a file", lambda c: ["eval", EVAL_CONFIG, "output_dir=/dev/null"],
     ["output_dir='/dev/null': '/dev/null' is a file, not a folder"]),
    ("eval resolution far too large for the memory", lambda c: ["eval", EVAL_CONFIG, f"output_dir={c.tmp / 'e'}",
                                                                "sampling.resolution=1000000"],
     ["sampling.resolution=1000000 with sampling.batch_size=", "for the decoded images alone", "check_memory=false"]),
    ("resolution not divisible by VAE factor", lambda c: c.train("data.resolution=33"),
     ["data.resolution=33 is not divisible by the VAE factor 2", "use a multiple of 2"]),
    ("model path does not exist", lambda c: c.train(model=c.tmp / "no-model"),
     ["does not exist", "pass a local diffusers folder or a hub id"]),
    ("folder that is no diffusers model", lambda c: c.train(model=c.tmp),
     ["not a diffusers pipeline folder (no model_index.json)"]),
    ("hub id with no network", lambda c: c.train(model="nobody-diffpo/no-such-model"),
     ["'nobody-diffpo/no-such-model' was not found locally", "HF_HUB_OFFLINE=1", "hf download nobody-diffpo/no-such-model",
      "local diffusers folder"]),
    ("unknown prediction type in the config", lambda c: c.train("model.prediction_type=sample"),
     ["model.prediction_type='sample' is not one of 'epsilon', 'v_prediction'"]),
    ("unknown prediction type in the model", lambda c: c.train(model=_scheduler_prediction_type(c, "sample")),
     ["prediction_type 'sample' is not supported", "set model.prediction_type"]),
    ("unknown method", lambda c: c.train("method=diffusion_dpoo"), ["method='diffusion_dpoo' is unknown", "did you mean 'diffusion_dpo'"]),
    ("unknown objective", lambda c: c.train("objective.name=dpoo"), ["objective.name='dpoo' is not one of"]),
    ("unknown reward in training", lambda c: c.train("method=d3po", "online.rewards=[pickscor]"),
     ["online.rewards: reward 'pickscor' is unknown", "did you mean 'pickscore'"]),
    ("unknown reward in score", lambda c: ["score", "--pairs", c.good, "--reward", "pickscor"],
     ["unknown reward 'pickscor'", "did you mean 'pickscore'"]),
    ("unknown reward in eval", lambda c: ["eval", str(Path(TINY_CONFIG).parents[1] / "eval" / "tiny.yaml"),
                                          f"output_dir={c.tmp / 'eval'}", "rewards.0.name=brightnes"],
     ["reward 'brightnes' is unknown", "did you mean 'brightness'"]),
    # datasets
    ("dataset does not exist", lambda c: c.train(data=c.tmp / "none.parquet"), ["no parquet files found"]),
    ("local dataset folder does not exist", lambda c: c.train(data=f"{c.tmp}/no-such-folder/"),
     ["no-such-folder/' does not exist (no such local file or folder)", "!hf download", "!download"]),
    ("relative dataset path does not exist", lambda c: c.train(data="data/shards/train"),
     ["data.source='data/shards/train' does not exist", "!hf download"]),
    ("captions are numbers", lambda c: c.strict(data=_column_of(c, "caption", list(range(8)))),
     ["column caption: the caption is not text but int ", "captions must be strings"]),
    ("captions are lists", lambda c: c.strict(data=_column_of(c, "caption", [["a", "b"]] * 8)),
     ["the caption is not text but list ['a', 'b']"]),
    ("labels are booleans", lambda c: c.train(data=_column_of(c, "label_0", [True, False] * 4)),
     ["column label_0 must hold numbers; row 0 has True (bool)"]),
    ("image of 1x1 pixels", lambda c: c.strict(data=with_row(c.tmp, jpg_0=png(size=(1, 1)))),
     ["row 8 column jpg_0: the image is 1x1 pixels, below the 16-pixel minimum side"]),
    ("hub dataset with no network", lambda c: c.train(data="nobody-diffpo/no-such-data"),
     ["dataset 'nobody-diffpo/no-such-data' was not found locally", "--repo-type dataset", "local parquet files"]),
    ("not a parquet file", lambda c: c.train(data=_garbage_parquet(c)), ["broken.parquet: not a readable parquet file"]),
    ("a parquet file read as JSON lines", lambda c: c.train("data.format=jsonl"),
     ["is a parquet file, but data.format=jsonl reads JSON lines: set data.format=auto"]),
    ("image column holding captions", lambda c: c.strict("data.image_0_column=caption", data=c.good),
     ["column caption: holds text (", "not an image or an image file: check data.image_0_column"]),
    ("missing column", lambda c: c.train("data.caption_column=prompt"),
     ["missing column(s) ['prompt']", "set data.image_0_column / image_1_column / label_column / caption_column"]),
    ("empty parquet", lambda c: c.train(data=_empty_parquet(c)), ["the dataset is empty"]),
    ("empty manifest", lambda c: c.train(data=_jsonl(c, [])), ["the dataset is empty (no JSON lines)"]),
    ("all pairs ties", lambda c: c.train(data=write_rows(c.tmp / "d" / "ties.parquet",
                                                         [dict(r, label_0=0.5) for r in good_rows(4)])),
     ["every pair is a tie (label 0.5)", "set data.keep_ties=true"]),
    ("label outside {0, 0.5, 1}", lambda c: c.train(data=with_row(c.tmp, label_0=0.7)),
     ["label_0 must be 0, 0.5 or 1", "row 8 has 0.7"]),
    ("label not a number", lambda c: c.train(data=write_rows(c.tmp / "d" / "s.parquet",
                                                             [dict(r, label_0=str(r["label_0"])) for r in good_rows(3)]
                                                             + [dict(good_rows(1)[0], label_0="left")])),
     ["column label_0 must hold numbers", "row 0 has '0.0' (text)", "store it as a number column"]),
    ("manifest line not UTF-8", lambda c: c.train(data=_jsonl(c, [GOOD_LINE, GOOD_LINE.replace(b"red", b"r\xffd")])),
     ["line 2 is not valid UTF-8 (byte 0xff", "diffpo data check"]),
    ("manifest line not JSON", lambda c: c.train(data=_jsonl(c, [GOOD_LINE, GOOD_LINE[:30]])),
     ["line 2 is not valid JSON"]),
    # bad samples with data.skip_bad_samples=false
    ("corrupt image", lambda c: c.strict(data=with_row(c.tmp, jpg_0=b"this is no image")),
     ["row 8 column jpg_0: corrupt or truncated image", "set it to true to skip"]),
    ("truncated image", lambda c: c.strict(data=with_row(c.tmp, jpg_1=jpeg((64, 64))[:300])),
     ["row 8 column jpg_1: corrupt or truncated image", "diffpo data check"]),
    ("empty image bytes", lambda c: c.strict(data=with_row(c.tmp, jpg_0=b"")), ["row 8 column jpg_0: the image is empty"]),
    ("image bomb header", lambda c: c.strict(data=with_row(c.tmp, jpg_0=bomb_png(100_000, 100_000))),
     ["row 8 column jpg_0: refused as a decompression bomb"]),
    ("image over the pixel limit", lambda c: c.strict(data=with_row(c.tmp, jpg_0=bomb_png(9_000, 9_000))),
     ["row 8 column jpg_0: 9000x9000 pixels exceeds the 64000000-pixel limit"]),
    ("image file missing", lambda c: c.strict(data=_jsonl(c, [GOOD_LINE] * 4 + [GOOD_LINE.replace(b'"jpg_0": "a.png"', b'"jpg_0": "gone.png"')])),
     ["row 4 column jpg_0: image file", "gone.png' does not exist"]),
    ("empty caption", lambda c: c.strict(data=with_row(c.tmp, caption="  ")), ["row 8 column caption: the caption is empty"]),
    ("null caption", lambda c: c.strict(data=with_row(c.tmp, caption=None)), ["row 8 column caption: the caption is missing"]),
    ("caption not UTF-8", lambda c: c.strict(data=with_row(c.tmp, caption=b"a red \xff circle")),
     ["row 8 column caption: not valid UTF-8 (byte 0xff at position 6)"]),
    ("video with too few frames", _short_clip,
     ["row 3 column video_0: the clip has 3 frames", "data.num_frames=4 are needed", "lower data.num_frames",
      "set it to true to skip"]),
    # cache, resume, output
    ("stale cache from another model", _stale_cache, ["is stale: it was built for another model or data", "source",
                                                      "set cache.dir to the cache root"]),
    ("resume from a different config", _resume_other_config,
     ["was saved by a run with a different config (lora.rank: 8 there, 4 here", "resume_from=latest"]),
    ("resume a checkpoint past max_steps", _resume_past_max_steps,
     ["checkpoints/step-2' is at step 2, past max_steps=1", "set max_steps >= 2", "new output_dir"]),
    ("data check report over its dataset", lambda c: ["data", "check", c.good, "--out", c.good],
     ["--out", "is the dataset file", "pass another --out"]),
    ("output dir under a file", _under_a_file, ["afile' is a file, not a folder", "choose another output_dir"]),
    pytest.param(_read_only, ["is not writable (Permission denied)"], id="read-only output dir",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")),
    ("disk too small for the checkpoints", lambda c: c.train("checkpoint_every=1", "checkpoints_total_limit=null",
                                                             "max_steps=1000000000000"),
     ["free but this run writes about", "set checkpoints_total_limit lower"]),
]


@pytest.mark.parametrize("build, expected", [r if hasattr(r, "marks") else pytest.param(*r[1:], id=r[0])
                                             for r in ROWS])
def test_bad_input_is_a_one_line_error(ctx, build, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(*build(ctx))
    line = error_line(err)
    assert code == 2
    for fragment in expected:
        if fragment.startswith("!"):  # must not be said
            assert fragment[1:] not in line, line
        else:
            assert fragment in line, line


# ---- unusual images are converted, not refused ------------------------------------------------


def _converted_rows() -> list[dict]:
    rows = good_rows(8)
    odd = [png(128, mode="L"), png((255, 0, 0, 0), mode="RGBA"), png((90, 40), mode="LA"), png(3, mode="P"),
           jpeg(mode="CMYK", colour=(0, 255, 255, 0)), png_16bit(), jpeg((6000, 4000))]
    for row, image in zip(rows, odd):
        row["jpg_0"] = image
    return rows


def test_grayscale_rgba_cmyk_16bit_and_huge_images_train(ctx):
    data = write_rows(ctx.tmp / "odd.parquet", _converted_rows())
    code, _, err = run_cli(*ctx.train("train_batch_size=8", data=data))
    assert code == 0, err[-3000:]
    metrics = [json.loads(line) for line in (ctx.tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_samples"] == 0 and np.isfinite(metrics[-1]["loss"])
    assert (ctx.tmp / "run" / "bad_samples.jsonl").read_text() == ""
    code, out, _ = run_cli("data", "check", data, "--out", ctx.tmp / "check.json", "--no-progress")
    report = json.loads((ctx.tmp / "check.json").read_text())
    assert code == 0 and report["ok"] and report["usable_pairs"] == 8
    assert report["converted_images"] == {"L": 1, "RGBA": 1, "LA": 1, "P": 1, "CMYK": 1, "I;16": 1}
    assert report["reduced_scale_images"] == 1 and "converted to RGB (not problems)" in out


def test_conversions_keep_the_colours():
    from diffpo.data.images import read_image

    assert read_image(png_16bit(65535)).image.getpixel((0, 0)) == (255, 255, 255)
    assert read_image(png_16bit(257 * 100)).image.getpixel((0, 0)) == (100, 100, 100)  # by bit depth, not clipped
    assert read_image(png((255, 0, 0, 0), mode="RGBA")).image.getpixel((0, 0)) == (255, 255, 255)  # on white
    assert read_image(png(128, mode="L")).image.getpixel((0, 0)) == (128, 128, 128)
    red, green, blue = read_image(jpeg(mode="CMYK", colour=(0, 255, 255, 0))).image.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60  # cyan 0, magenta and yellow full: red


def test_huge_jpeg_decodes_at_reduced_scale_and_bombs_decode_nothing():
    from diffpo.data.images import BadSampleError, read_image

    huge = jpeg((6000, 4000))
    decoded = read_image(huge, min_side=32)
    # the smallest DCT scale (1/8) that keeps the shorter side >= 2 x 32: 750x500, 1/64 of the pixels
    assert decoded.image.size == (750, 500) and decoded.reduced and decoded.original_size == (6000, 4000)
    assert read_image(jpeg((64, 48)), min_side=16).image.size == (64, 48)  # small images: exactly as stored
    with pytest.raises(BadSampleError, match="decompression bomb"):
        read_image(bomb_png(100_000, 100_000))
    with pytest.raises(BadSampleError, match="exceeds the 64000000-pixel limit"):
        read_image(bomb_png(9_000, 9_000))


# ---- bad samples: skipped, counted, listed; fatal on request ---------------------------------


def _dirty(tmp_path: Path) -> str:
    rows = good_rows(11)
    rows[8]["jpg_0"] = b"corrupt"
    rows[9]["caption"] = ""
    rows[10]["caption"] = b"caf\xe9"  # latin-1, not UTF-8
    return write_rows(tmp_path / "dirty.parquet", rows)


def test_bad_samples_are_skipped_counted_and_listed(ctx):
    data = _dirty(ctx.tmp)
    # one batch of all 11 pairs: every bad one is met (and replaced by the next good one)
    code, _, err = run_cli(*ctx.train("train_batch_size=11", data=data))
    assert code == 0, err[-3000:]
    run = ctx.tmp / "run"
    listed = [json.loads(line) for line in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["row"] for r in listed) == [8, 9, 10]
    errors = {r["row"]: r["error"] for r in listed}
    assert "corrupt" in errors[8] and "caption is empty" in errors[9] and "not valid UTF-8" in errors[10]
    assert all(r["step"] == 1 for r in listed)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["bad_samples"] == 3
    # resumed for a second epoch: the same rows are met again but listed and counted once
    code, _, err = run_cli(*ctx.train("train_batch_size=11", "max_steps=2", "resume_from=latest", data=data))
    assert code == 0, err[-3000:]
    assert len((run / "bad_samples.jsonl").read_text().splitlines()) == 3
    assert [json.loads(l)["bad_samples"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [3, 3]


def test_bad_samples_met_while_caching_are_listed_too(ctx):
    data = _dirty(ctx.tmp)
    args = [f"model.pretrained={ctx.tiny}", f"data.source={data}", f"cache.dir={ctx.tmp / 'cache'}"]
    code, out, err = run_cli("cache", TINY_CONFIG, *args)
    assert code == 0 and "3 bad samples skipped" in out, err[-2000:]
    code, _, err = run_cli(*ctx.train("cache.enabled=true", f"cache.dir={ctx.tmp / 'cache'}", "train_batch_size=11",
                                      data=data))
    assert code == 0, err[-3000:]
    assert json.loads((ctx.tmp / "run" / "metrics.jsonl").read_text().splitlines()[-1])["bad_samples"] == 3
    assert len((ctx.tmp / "run" / "bad_samples.jsonl").read_text().splitlines()) == 3


# ---- diffpo data check ------------------------------------------------------------------------


def test_data_check_reports_every_problem_at_once(ctx):
    rows = good_rows(10)
    rows[1]["jpg_0"] = b"corrupt"
    rows[2]["jpg_1"] = jpeg((64, 64))[:300]
    rows[3]["caption"] = "   "
    rows[4]["caption"] = b"caf\xe9"
    rows[5]["label_0"] = 0.7
    rows[6]["jpg_1"] = bomb_png(100_000, 100_000)
    rows[7]["label_0"] = 0.5
    folder = ctx.tmp / "pickapic"  # a folder of shards, as a Pick-a-Pic download
    write_rows(folder / "train-0.parquet", rows[:5])
    write_rows(folder / "train-1.parquet", rows[5:])
    write_rows(folder / "train-2.parquet", [])  # an empty shard is no problem
    (folder / "train-3.parquet").write_bytes(b"garbage")
    code, out, _ = run_cli("data", "check", folder, "--out", ctx.tmp / "report.json", "--no-progress")
    assert code == 1
    report = json.loads((ctx.tmp / "report.json").read_text())
    assert report["problem_counts"] == {"unreadable": 1, "corrupt_image": 3, "empty_caption": 1,
                                        "caption_not_utf8": 1, "bad_label": 1}
    rows_of = {(p["kind"], p["row"]) for p in report["problems"]}
    assert {("corrupt_image", 1), ("corrupt_image", 2), ("corrupt_image", 6), ("empty_caption", 3),
            ("caption_not_utf8", 4), ("bad_label", 5)} <= rows_of
    assert any(p["where"] == "train-1.parquet row 1" for p in report["problems"])  # row 6 = shard 1's row 1
    assert report["rows"] == 10 and report["ties"] == 1 and report["usable_pairs"] == 3
    assert "train-3.parquet: not a readable parquet file" in out and "report:" in out


def test_data_check_manifest_lines_columns_empty_and_ties(ctx):
    manifest = _jsonl(ctx, [GOOD_LINE, GOOD_LINE.replace(b"red", b"r\xffd"), b"[1, 2]", GOOD_LINE[:20],
                            GOOD_LINE.replace(b'"label_0": 1', b'"label_0": 2'),
                            GOOD_LINE.replace(b'"jpg_0": "a.png"', b'"jpg_0": "gone.png"')])
    code, _, _ = run_cli("data", "check", manifest, "--out", ctx.tmp / "m.json", "--no-progress")
    report = json.loads((ctx.tmp / "m.json").read_text())
    assert code == 1 and report["problem_counts"] == {"unreadable": 3, "bad_label": 1, "corrupt_image": 1}
    assert [p["where"] for p in report["problems"] if p["kind"] == "unreadable"] == ["line 2", "line 3", "line 4"]
    assert report["usable_pairs"] == 1

    ties = write_rows(ctx.tmp / "ties.parquet", [dict(r, label_0=0.5) for r in good_rows(3)])
    code, _, _ = run_cli("data", "check", ties, "--out", ctx.tmp / "t.json", "--no-progress")
    assert code == 1 and json.loads((ctx.tmp / "t.json").read_text())["problem_counts"] == {"all_ties": 1}
    code, _, _ = run_cli("data", "check", ties, "keep_ties=true", "--out", ctx.tmp / "t.json", "--no-progress")
    assert code == 0

    code, _, _ = run_cli("data", "check", ctx.good, "caption_column=prompt", "--out", ctx.tmp / "c.json", "--no-progress")
    assert code == 1 and "missing_column" in json.loads((ctx.tmp / "c.json").read_text())["problem_counts"]
    code, _, _ = run_cli("data", "check", _empty_parquet(ctx), "--out", ctx.tmp / "e.json", "--no-progress")
    assert code == 1 and json.loads((ctx.tmp / "e.json").read_text())["problem_counts"] == {"empty": 1}


def test_data_check_lists_short_and_unreadable_video_clips(ctx):
    manifest = _clip_manifest(ctx, broken=True)
    columns = [o[len("data."):] for o in VIDEO_COLUMNS]
    code, _, _ = run_cli("data", "check", manifest, *columns, "--out", ctx.tmp / "v.json", "--no-progress")
    report = json.loads((ctx.tmp / "v.json").read_text())
    assert code == 1 and report["problem_counts"] == {"too_few_frames": 1, "corrupt_video": 1}
    assert {(p["kind"], p["row"]) for p in report["problems"]} == {("too_few_frames", 3), ("corrupt_video", 1)}
    assert report["usable_pairs"] == 2
    code, _, _ = run_cli("data", "check", manifest, *columns, "num_frames=3", "--out", ctx.tmp / "v3.json", "--no-progress")
    assert code == 1 and json.loads((ctx.tmp / "v3.json").read_text())["problem_counts"] == {"corrupt_video": 1}


def test_data_check_of_a_clean_dataset_exits_zero(ctx):
    code, out, _ = run_cli("data", "check", ctx.good, "--out", ctx.tmp / "ok.json", "--no-progress")
    report = json.loads((ctx.tmp / "ok.json").read_text())
    assert code == 0 and report["ok"] and report["usable_pairs"] == 32 and "0 problem(s)" in out
    blank = with_row(ctx.tmp, caption="")
    assert run_cli("data", "check", blank, "--out", ctx.tmp / "b.json", "--no-progress")[0] == 1
    assert run_cli("data", "check", blank, "allow_empty_captions=true", "--out", ctx.tmp / "b.json", "--no-progress")[0] == 0
    code, out, _ = run_cli("data", "check", "--help")
    assert code == 0 and "usage: diffpo data check" in out


# ---- stale caches and resumes that are fine ---------------------------------------------------


def test_a_model_replaced_in_place_gets_a_new_cache(ctx):
    from diffusers import AutoencoderKL

    from diffpo.models.tiny import build_tiny_sd_components

    model = ctx.model_copy()
    args = ["cache", TINY_CONFIG, f"model.pretrained={model}", f"data.source={ctx.good}", f"cache.dir={ctx.tmp / 'c'}"]
    assert run_cli(*args)[0] == 0
    assert run_cli(*args)[0] == 0 and len(list((ctx.tmp / "c").iterdir())) == 1  # reused
    vae: AutoencoderKL = build_tiny_sd_components(seed=1)["vae"]  # same config, other weights, same path
    vae.save_pretrained(Path(model) / "vae")
    assert run_cli(*args)[0] == 0 and len(list((ctx.tmp / "c").iterdir())) == 2  # not reused: a new key


def test_resume_with_a_changed_learning_rate_is_noted_not_refused(ctx):
    assert run_cli(*ctx.train())[0] == 0
    code, out, err = run_cli(*ctx.train("resume_from=latest", "max_steps=2", "optim.lr=1e-4"))
    assert code == 0, err[-2000:]
    assert "note: resuming with changed settings: max_steps: 1 -> 2; optim.lr: 0.001 -> 0.0001" in out


# ---- the real process: no traceback ---------------------------------------------------------------


def _subprocess(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffpo", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, **kwargs)


def test_a_bad_sample_in_a_loader_worker_is_one_line_without_traceback(ctx):
    data = with_row(ctx.tmp, jpg_0=b"corrupt")
    result = _subprocess(ctx.strict("data.num_workers=1", "train_batch_size=9", data=data))
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "row 8 column jpg_0: corrupt or truncated image" in line and "DataLoader" not in line


def test_a_write_that_hits_a_limit_is_one_line_naming_the_output(ctx):
    """A file-size limit (ulimit -f, EFBIG) stands in for a full disk (ENOSPC): the same path in
    diffpo, and it needs no privileges. The run's 0.3 MB LoRA checkpoint exceeds the 200 kB limit."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = _subprocess(ctx.train(), preexec_fn=limit)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "file too large" in line and f"while writing '{ctx.tmp / 'run'}'" in line and "resume_from=latest" in line


# ---- a failing run leaves an earlier run's files as they were ----------------------------------


def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_a_failing_rerun_into_a_finished_run_dir_changes_nothing_there(ctx):
    code, _, err = run_cli(*ctx.train("max_steps=2", "checkpoint_every=1", "log_every=1"))
    assert code == 0, err[-2000:]
    run = ctx.tmp / "run"
    before = _files(run)
    assert set(before) == {"config.yaml", "metrics.jsonl", "bad_samples.jsonl"}
    truncated = ctx.tmp / "truncated.parquet"
    truncated.write_bytes(Path(ctx.good).read_bytes()[:2000])
    # a fresh start on unreadable data, a resume on unreadable data, and a first step that is NaN
    for args in (ctx.train(data=truncated), ctx.train("resume_from=latest", "max_steps=3", data=truncated),
                 ctx.train("objective.beta=1e30")):
        code, _, err = run_cli(*args)
        assert code == 2, err[-2000:]
        assert _files(run) == before, error_line(err)
    # the NaN stop names no checkpoint of the earlier run as this run's last good one
    assert "last good checkpoint: none yet" in error_line(err)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    # a good rerun still starts (and only then replaces the files)
    code, _, err = run_cli(*ctx.train("max_steps=1", "log_every=1"))
    assert code == 0, err[-2000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_resumed_run_that_stops_on_nan_names_the_checkpoint_it_resumed_from(ctx):
    code, _, err = run_cli(*ctx.train("max_steps=2", "checkpoint_every=1"))
    assert code == 0, err[-2000:]
    code, _, err = run_cli(*ctx.train("resume_from=latest", "max_steps=4", "objective.beta=1e30"))
    assert code == 2
    assert f"last good checkpoint: {ctx.tmp / 'run' / 'checkpoints' / 'step-2'}" in error_line(err)


def test_the_same_data_file_relative_then_absolute_resumes(ctx, monkeypatch):
    """The run dir keeps local input paths absolute, so a resume from another folder, with the
    path written another way, is the same config."""
    data = ctx.tmp / "work" / "data" / "pairs.parquet"
    data.parent.mkdir(parents=True)
    shutil.copy(ctx.good, data)
    monkeypatch.chdir(ctx.tmp / "work")
    code, _, err = run_cli(*ctx.train("max_steps=1", data="data/pairs.parquet"))
    assert code == 0, err[-2000:]
    monkeypatch.chdir(ctx.tmp)
    code, out, err = run_cli(*ctx.train("resume_from=latest", "max_steps=2", data=data))
    assert code == 0, err[-2000:]
    assert "resumed from" in out and "data.source" not in out  # not even a note: the same file
    code, _, err = run_cli("train", ctx.tmp / "run" / "config.yaml", "resume_from=latest", "max_steps=3")
    assert code == 0, err[-2000:]


# ---- no command writes over its inputs ----------------------------------------------------------


def test_no_command_writes_over_its_own_inputs(ctx, monkeypatch):
    data = ctx.tmp / "d" / "pairs.parquet"
    data.parent.mkdir()
    shutil.copy(ctx.good, data)
    original = data.read_bytes()
    monkeypatch.chdir(ctx.tmp)
    images = ctx.tmp / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    (images / "prompts.txt").write_text("a black square\n")
    cases = [
        (["data", "check", "d/pairs.parquet", "--out", data], "is the dataset file"),  # relative vs absolute
        (["data", "check", data, "--out", "./d/../d/pairs.parquet"], "is the dataset file"),
        (["data", "check", "d", "--out", "d/report.parquet"], "lies inside the dataset folder"),
        (["data", "top-k", "--source", data, "--reward", "brightness", "--k", "1", "--out", "d/pairs.parquet"],
         "is the --source file"),
        (["score", "--images", images, "--prompts", images / "prompts.txt", "--reward", "brightness", "--out",
          "images/prompts.txt"], "is the --prompts file"),
        (["score", "--pairs", data, "--reward", "brightness", "--out", "d/pairs.parquet"], "is the input file"),
    ]
    for args, message in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and message in error_line(err), (args, err[-1000:])
    assert data.read_bytes() == original and (images / "prompts.txt").read_text() == "a black square\n"


# ---- the same type rules in training and in diffpo data check -----------------------------------


def test_data_check_applies_the_training_type_rules(ctx):
    rows = good_rows(6)
    rows[1]["jpg_1"] = png(size=(8, 40))
    for row in rows:  # labels as text ('0.0', '1.0'): a CSV export's mistake
        row["label_0"] = str(row["label_0"])
    data = write_rows(ctx.tmp / "mixed.parquet", rows)
    ints = _column_of(ctx, "caption", list(range(8)))
    code, _, _ = run_cli("data", "check", data, "--out", ctx.tmp / "m.json", "--no-progress")
    report = json.loads((ctx.tmp / "m.json").read_text())
    assert code == 1 and report["problem_counts"] == {"bad_label": 6, "too_small_image": 1}
    (small,) = [p for p in report["problems"] if p["kind"] == "too_small_image"]
    assert "row 1 column jpg_1: the image is 8x40 pixels, below the 16-pixel minimum side" in small["message"]
    assert "row 0: label_0='0.0' is text, not a number" in report["problems"][0]["message"]
    code, _, _ = run_cli("data", "check", ints, "--out", ctx.tmp / "i.json", "--no-progress")
    report = json.loads((ctx.tmp / "i.json").read_text())
    assert code == 1 and report["problem_counts"] == {"caption_not_text": 8} and report["usable_pairs"] == 0


def test_command_line_numbers_are_range_checked(capsys):
    for args, message in ((["data", "check", "x.parquet", "--max-rows", "-5"], "argument --max-rows: must be >= 1, got -5"),
                          (["data", "check", "x.parquet", "--max-rows", "0"], "must be >= 1, got 0"),
                          (["score", "--pairs", "x.parquet", "--reward", "clip", "--batch-size", "0"],
                           "argument --batch-size: must be >= 1, got 0"),
                          (["data", "top-k", "--source", "x", "--reward", "clip", "--k", "-1", "--out", "o.parquet"],
                           "argument --k: must be >= 1, got -1")):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
