"""Metrics rows to metrics.jsonl and TensorBoard event files; loss.png and ``jqlora plot``."""

import io
import json
import struct
import sys

import numpy as np
import pytest

from jqlora.cli import main
from jqlora.training.config import ConfigError, load_config
from jqlora.training.fingerprint import changed_settings, settings
from jqlora.training.metrics_writers import MetricsLog, TensorBoardWriter, crc32c
from jqlora.training.plot import read_metrics

from .toy import tiny_model_dir, write_reverse_task

ROWS = [{"step": 1, "loss": 2.5, "learning_rate": 1e-3, "grad_norm": 0.75, "skipped_steps": 0},
        {"step": 2, "loss": 2.0, "learning_rate": 5e-4, "grad_norm": 0.5, "skipped_steps": 0},
        {"step": 2, "eval_loss": 2.25, "eval_perplexity": 9.5},
        {"step": 3, "loss": 1.5, "learning_rate": 2.5e-4, "grad_norm": 0.25, "skipped_steps": 1},
        {"step": 3, "eval_loss": 1.75, "adapter_dir": "out/adapter", "done": True}]


def _masked(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf: bytes, i: int) -> tuple[int, int]:
  n = shift = 0
  while True:
    b = buf[i]
    n, shift, i = n | (b & 0x7F) << shift, shift + 7, i + 1
    if not b & 0x80:
      return n, i


def _fields(buf: bytes) -> list[tuple[int, int | float | bytes]]:
  """(field number, value) of a protobuf message: varints, doubles, floats, byte strings."""
  out, i = [], 0
  while i < len(buf):
    key, i = _varint(buf, i)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, i = _varint(buf, i)
    elif wire == 1:
      value, i = struct.unpack("<d", buf[i:i + 8])[0], i + 8
    elif wire == 5:
      value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
    else:
      assert wire == 2, wire
      size, i = _varint(buf, i)
      value, i = buf[i:i + size], i + size
    out.append((number, value))
  return out


def _events(path) -> list[dict]:
  """The events of a TFRecord event file, each CRC checked: step, file_version, scalars."""
  data, i, events = path.read_bytes(), 0, []
  while i < len(data):
    header = data[i:i + 8]
    (size,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[i + 8:i + 12])[0] == _masked(header)
    record = data[i + 12:i + 12 + size]
    assert struct.unpack("<I", data[i + 12 + size:i + 16 + size])[0] == _masked(record)
    i += 16 + size
    event = {"scalars": {}}
    for number, value in _fields(record):
      if number == 1:
        event["wall_time"] = value
      elif number == 2:
        event["step"] = value
      elif number == 3:
        event["file_version"] = value.decode()
      elif number == 5:
        for _, v in _fields(value):
          tag_value = dict(_fields(v))
          event["scalars"][tag_value[1].decode()] = tag_value[2]
    events.append(event)
  return events


def test_crc32c_matches_the_castagnoli_check_value():
  assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
  assert crc32c(b"") == 0


def test_tensorboard_events_hold_every_number_of_every_row_at_its_step(tmp_path):
  jsonl = io.StringIO()
  writer = TensorBoardWriter(tmp_path / "tb")
  log = MetricsLog(jsonl, writer)
  for row in ROWS:
    log.write(row)
  assert [json.loads(line) for line in jsonl.getvalue().splitlines()] == ROWS
  log.close()
  [path] = (tmp_path / "tb").iterdir()
  assert path == writer.path and path.name.startswith("events.out.tfevents.")
  first, *events = _events(path)
  assert first["file_version"] == "brain.Event:2" and first["step"] == 0
  assert [e["step"] for e in events] == [r["step"] for r in ROWS]
  for event, row in zip(events, ROWS, strict=True):
    numbers = {k: v for k, v in row.items()
               if k != "step" and isinstance(v, float | int) and not isinstance(v, bool)}
    assert event["scalars"].keys() == numbers.keys()  # no adapter_dir, no bool
    np.testing.assert_allclose(list(event["scalars"].values()), list(numbers.values()), rtol=1e-7)
    assert abs(event["wall_time"] - first["wall_time"]) < 60


def _run_dir(tmp_path, text):
  run = tmp_path / "run"
  run.mkdir(parents=True)
  (run / "metrics.jsonl").write_text(text)
  return run


def test_read_metrics_drops_a_torn_last_line_and_rejects_garbled_or_missing_files(tmp_path):
  text = "".join(json.dumps(r) + "\n" for r in ROWS)
  assert read_metrics(_run_dir(tmp_path, text + '{"step": 4, "lo')) == ROWS
  with pytest.raises(ConfigError, match=r"metrics.jsonl line 2: expected a JSON object"):
    read_metrics(_run_dir(tmp_path / "a", '{"step": 1, "loss": 1.0}\nnot json\n'))
  with pytest.raises(ConfigError, match="line 1: expected a JSON object with a step"):
    read_metrics(_run_dir(tmp_path / "b", "[1, 2]\n"))
  with pytest.raises(ConfigError, match="no row has a loss"):
    read_metrics(_run_dir(tmp_path / "c", '{"step": 0, "exact_match": 0.0}\n'))
  with pytest.raises(ConfigError, match="does not exist; expected the metrics.jsonl"):
    read_metrics(tmp_path / "nowhere")


def test_jqlora_plot_draws_loss_eval_loss_and_learning_rate(tmp_path, capsys):
  from matplotlib import image

  run = _run_dir(tmp_path, "".join(json.dumps(r) + "\n" for r in ROWS))
  assert main(["plot", str(run)]) == 0
  assert capsys.readouterr().out == f"wrote {run / 'loss.png'}\n"
  pixels = image.imread(run / "loss.png")
  assert pixels.shape[:2] == (500, 700)  # 7 x 5 inches at 100 dpi
  assert pixels[..., :3].std() > 0.05  # curves drawn, not a blank canvas


def test_jqlora_plot_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
  assert main(["plot", str(tmp_path / "nowhere")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("jqlora plot: error: ") and "does not exist" in err
  run = _run_dir(tmp_path, "{oops\n{}\n")
  assert main(["plot", str(run)]) == 2
  err = capsys.readouterr().err
  assert err == f"jqlora plot: error: {run / 'metrics.jsonl'} line 1: expected a JSON object with a step, " \
                "got '{oops'\n"
  (run / "metrics.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
  assert main(["plot", str(run)]) == 2
  assert capsys.readouterr().err == \
      "jqlora plot: error: drawing loss.png needs matplotlib: pip install matplotlib\n"
  assert not (run / "loss.png").exists()


def test_train_without_matplotlib_skips_loss_png_with_one_warning(tmp_path, monkeypatch, caplog):
  from jqlora.training.loop import _plot

  run = _run_dir(tmp_path, json.dumps(ROWS[0]) + "\n")
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  out = io.StringIO()
  with caplog.at_level("WARNING", logger="jqlora"):
    _plot(run, out)
  assert [r.getMessage() for r in caplog.records] == [
      "loss.png skipped: matplotlib is not installed (pip install matplotlib)"]
  assert out.getvalue() == "" and not (run / "loss.png").exists()


def test_logging_key_parses_needs_jsonl_and_does_not_shape_the_run(tmp_path):
  data = tmp_path / "d.jsonl"
  write_reverse_task(data, 2)
  plain = load_config(None, {"dataset": str(data)})
  assert plain.logging == ["jsonl"]
  both = load_config(None, {"dataset": str(data), "logging": "jsonl, tensorboard"})
  assert both.logging == ["jsonl", "tensorboard"]
  assert changed_settings(settings(plain), both) == []  # a resume may switch TensorBoard on
  with pytest.raises(ConfigError, match="logging must include jsonl"):
    load_config(None, {"dataset": str(data), "logging": "tensorboard"})
  with pytest.raises(ConfigError, match=r"logging must be list\['jsonl' \| 'tensorboard'\], got 'csv'"):
    load_config(None, {"dataset": str(data), "logging": "csv"})


@pytest.mark.slow
def test_train_writes_tensorboard_scalars_equal_to_metrics_jsonl_and_loss_png(data_dir, tmp_path):
  data = tmp_path / "train.jsonl"
  write_reverse_task(data, 24)
  out = tmp_path / "out"
  config = f"""base_model: {tiny_model_dir(data_dir, tmp_path)}
dataset: {data}
dtype: float32
lora_r: 4
sequence_len: 48
sample_packing: true
micro_batch_size: 2
max_steps: 4
learning_rate: 1.0e-2
val_set_size: 4
eval_steps: 2
output_dir: {out}
logging: [jsonl, tensorboard]
"""
  (tmp_path / "c.yaml").write_text(config)
  assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 0
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  [path] = (out / "tensorboard").iterdir()
  events = _events(path)[1:]
  assert [e["step"] for e in events] == [r["step"] for r in rows]
  losses = [(e["step"], e["scalars"]["loss"]) for e in events if "loss" in e["scalars"]]
  assert [s for s, _ in losses] == [1, 2, 3, 4]
  np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in rows if "loss" in r],
                             rtol=1e-6)
  assert sum("eval_loss" in e["scalars"] for e in events) == 2  # step 2 and the final one
  assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
