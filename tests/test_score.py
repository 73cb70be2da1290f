"""The scoring pipeline on a real local Ray cluster (2 nodes) and a real S3 server (moto over HTTP)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from cxr import storage
from cxr.checkpoint import load_checkpoint
from cxr.decode import decode
from cxr.preprocess import preprocess
from cxr.resources import plan_resources
from cxr.score import OUTPUT_SCHEMA, measure_costs, score
from support.images import IGNORED, compress_dicom, dicom_bytes, png_bytes, xray_like
from support.jobs import run_job
from support.s3 import upload_tree

pytestmark = pytest.mark.timeout(300)


def read_table(uri: str) -> pa.Table:
    fs, path = storage.filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def expected_probs(model_uri: str, files: dict) -> dict[str, float]:
    """What the model gives for each good file when called directly, outside Ray."""
    loaded = load_checkpoint(model_uri)
    names = [n for n, (_, err, _) in files.items() if err is None]
    images = np.stack([preprocess(decode(files[n][0], n).image, loaded.info.preprocess) for n in names])
    return dict(zip(names, loaded.predict_proba(images).tolist()))


def check_table(table: pa.Table, files: dict, prefix: str, model_uri: str) -> None:
    """One row per input file, exact errors, null columns on error rows, probabilities as the model gives."""
    assert table.schema.equals(OUTPUT_SCHEMA), table.schema
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows, "duplicate rows"
    assert set(rows) == {f"{prefix}/{name}" for name in files}, "rows differ from the input files"
    direct = expected_probs(model_uri, files)
    info = load_checkpoint(model_uri).info
    for name, (data, error, size) in files.items():
        row = rows[f"{prefix}/{name}"]
        assert row["model"] == info.model_id and row["threshold"] == pytest.approx(info.threshold)
        if error is None:
            assert row["error"] is None, row
            assert (row["width"], row["height"]) == size
            assert row["prob_covid"] == pytest.approx(direct[name], abs=1e-5)
            assert row["prediction"] == ("covid" if row["prob_covid"] >= row["threshold"] else "non")
        else:
            assert row["error"].startswith(error), (name, row["error"])
            assert row["prob_covid"] is None and row["prediction"] is None
            assert row["width"] is None and row["height"] is None
        assert row["view"] == decode(data, name).view, (name, row["view"])  # DICOM ViewPosition, else null
    assert len({r["run_id"] for r in rows.values()}) == 1
    now = datetime.now(UTC)
    assert all(now - timedelta(minutes=10) < r["scored_at"] <= now for r in rows.values())


def _some_node_keeps_task_cpus(nodes, plan) -> bool:
    """Worst case placement: Ray packs actors onto nodes greedily; is a task still schedulable?"""
    free = sorted(nodes, reverse=True)
    for _ in range(plan.actors):
        i = next((i for i, f in enumerate(free) if f >= plan.cpus_per_actor), None)
        if i is None:
            break
        free[i] -= plan.cpus_per_actor
    return max(free) >= plan.task_cpus


@pytest.mark.parametrize("nodes", [[2], [2, 1], [16], [16, 16, 16, 16], [4, 2, 1], [8, 0.5]])
@pytest.mark.parametrize(
    "ask",
    [
        {},
        {"cpus_per_actor": 1},
        {"cpus_per_actor": 2},
        {"cpus_per_actor": 64},
        {"decode_share": 0.99},
        {"decode_share": 0.5},
    ],
)
def test_default_pool_never_lets_actors_starve_the_tasks(nodes, ask):
    plan = plan_resources(nodes, **ask)
    assert plan.actors >= 1 and plan.threads_per_actor >= 1 and plan.gpus_per_actor == 0
    assert _some_node_keeps_task_cpus(nodes, plan), plan


@pytest.mark.parametrize("nodes", [[2], [2, 1], [16], [8, 0.5]])
def test_asked_actors_are_the_pools_maximum_and_none_takes_a_whole_node(nodes):
    # more than fits now: the pool may grow as an autoscaling cluster adds nodes (Ray Data scales it within its budget)
    plan = plan_resources(nodes, actors=64, cpus_per_actor=64)
    assert plan.actors == 64 and plan.cpus_per_actor <= max(nodes) - plan.task_cpus
    # GPU actors on a cluster whose GPU nodes start from zero: one by default, as many as asked for
    assert plan_resources(nodes, gpus_per_actor=1).actors == 1
    assert plan_resources(nodes, gpus_per_actor=1, actors=4).actors == 4


def test_plan_defaults():
    plan = plan_resources([2])  # this machine: one actor using both cores, half a CPU kept for tasks
    assert (plan.actors, plan.cpus_per_actor, plan.threads_per_actor, plan.task_cpus) == (1, 1.5, 2, 0.5)
    greedy = plan_resources([2, 1], cpus_per_actor=2)
    assert (greedy.actors, greedy.cpus_per_actor, greedy.threads_per_actor) == (
        1,
        1.5,
        2,
    )  # threads as asked, reservation shrinks
    big = plan_resources([16, 16])  # two 8-thread actors per 16-core node
    assert (big.actors, big.threads_per_actor) == (4, 8)
    gpu = plan_resources([16, 16], total_gpus=4)
    assert (gpu.actors, gpu.gpus_per_actor, gpu.batch_size, gpu.task_cpus) == (4, 1.0, 256, 1.0)
    assert plan.decode_share is None


def test_plan_gives_decoding_the_cpus_its_measured_share_needs():
    # the model is the cost (PNG/JPEG at 224 px): the fixed plan, whatever the share says
    assert replace(plan_resources([2], decode_share=0.2), decode_share=None) == plan_resources([2])
    assert replace(plan_resources([16, 16], decode_share=0.0), decode_share=None) == plan_resources([16, 16])
    # compressed full-size DICOM (decoding ~99% of the work): one actor holding half a CPU; the rest decodes
    dicom = plan_resources([2], decode_share=0.99)
    assert (dicom.actors, dicom.cpus_per_actor, dicom.threads_per_actor, dicom.decode_share) == (1, 0.5, 2, 0.99)
    cloud = plan_resources([16, 16], decode_share=0.99)  # the fixed plan: 4 actors x 7.5 CPUs, 2 CPUs left to decode
    assert (cloud.actors, cloud.cpus_per_actor, cloud.threads_per_actor) == (1, 0.5, 8)
    half = plan_resources([16, 16], decode_share=0.5)  # half the work each: half the cluster to the model
    assert (half.actors, half.cpus_per_actor) == (4, 4.0)
    # CPUs asked for, or GPU actors: the measured share does not apply
    asked = plan_resources([2], cpus_per_actor=1, decode_share=0.99)
    assert (asked.cpus_per_actor, asked.decode_share) == (1, None)
    assert plan_resources([16, 16], total_gpus=4, decode_share=0.99) == plan_resources([16, 16], total_gpus=4)


def test_measure_costs_samples_across_the_inputs_and_restores_threads(tmp_path, tiny_model, monkeypatch):
    import torch

    import cxr.score

    big = compress_dicom(dicom_bytes(xray_like(1200, 1000, seed=1).astype(np.uint16) * 16), "1.2.840.10008.1.2.4.70")
    small = png_bytes(xray_like(48, 48, seed=2))
    paths = []
    for i in range(20):  # an archive sorted by folder: PNGs first, then DICOMs, one broken file
        name = f"{i:02d}.png" if i < 10 else f"{i:02d}.dcm"
        (tmp_path / name).write_bytes(small if i < 10 else (big if i != 11 else b"broken"))
        paths.append(str(tmp_path / name))
    loaded = load_checkpoint(tiny_model)
    settings = storage.s3_settings()
    threads = torch.get_num_threads()

    seen = []
    real = cxr.score._load_one
    monkeypatch.setattr(cxr.score, "_load_one", lambda path, *a, **k: seen.append(path) or real(path, *a, **k))
    mixed = measure_costs(pa.array(paths), loaded, settings, max_seconds=60)
    assert seen == [
        paths[i] for i in (0, 0, 3, 5, 8, 11, 14, 16, 19)
    ]  # an untimed first call, then 8 files spread evenly
    assert mixed.files == 8 and torch.get_num_threads() == threads
    assert mixed.model_s > 0 and 0 < mixed.decode_share < 1
    seen.clear()
    assert measure_costs(paths, loaded, settings, max_seconds=0).files == 1 and len(seen) == 2  # stops when out of time

    pngs = measure_costs(paths[:10], loaded, settings, max_seconds=60)
    dicoms = measure_costs([p for p in paths[10:] if not p.endswith("11.dcm")], loaded, settings, max_seconds=60)
    assert dicoms.decode_s > 20 * pngs.decode_s and dicoms.decode_share > pngs.decode_share  # ~0.1 s against ~0.3 ms
    assert pngs.decode_s < mixed.decode_s < dicoms.decode_s


def test_measure_costs_does_not_wait_for_a_read_that_hangs(tmp_path, tiny_model, monkeypatch):
    import threading

    import cxr.score

    paths = []
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(xray_like(48, 48, seed=i)))
        paths.append(str(tmp_path / f"{i}.png"))
    stuck, real = threading.Event(), cxr.score._load_one

    def load(path, *a, **k):  # a stuck S3 request: every read from the 4th file on never returns (until released)
        if path in paths[3:]:
            stuck.wait()
        return real(path, *a, **k)

    monkeypatch.setattr(cxr.score, "_load_one", load)
    loaded, settings = load_checkpoint(tiny_model), storage.s3_settings()
    try:
        costs = measure_costs(paths, loaded, settings, max_seconds=0.5)  # returns while the 4th read still hangs
        assert costs is not None and costs.files == 3  # what was done by then
        assert (
            measure_costs(paths[3:], loaded, settings, max_seconds=0.5) is None
        )  # nothing done: the caller keeps the fixed plan
    finally:
        stuck.set()


def test_score_folder_of_mixed_good_and_broken_files(ray_driver, mixed_folder, tiny_model, tmp_path):
    folder, files = mixed_folder
    out = str(tmp_path / "scores")
    summary = score([str(folder)], out, tiny_model)
    table = read_table(out)
    check_table(table, files, str(folder), tiny_model)
    assert not any(p.endswith(tuple(IGNORED)) for p in table["path"].to_pylist())
    n_bad = sum(1 for _, e, _ in files.values() if e)
    assert (summary.files, summary.errors, summary.scored) == (len(files), n_bad, len(files) - n_bad)
    written = json.loads((tmp_path / "scores" / "_summary.json").read_text())
    assert written["files"] == len(files) and written["run_id"] == table["run_id"][0].as_py()
    assert 0 < written["plan"]["decode_share"] < 1 and written["plan"]["gpus_per_actor"] == 0  # sized by measured costs


def test_lateral_and_oblique_dicom_views_are_error_rows_unless_all_views(ray_driver, tiny_model, tmp_path):
    px = xray_like(64, 64, seed=4).astype(np.uint16) * 16
    folder = tmp_path / "views"
    folder.mkdir()
    for name, view in (
        ("pa", "PA"),
        ("ap", "AP"),
        ("lateral", "LL"),
        ("oblique", "RAO"),
        ("decubitus", "LLD"),
        ("none", None),
    ):
        (folder / f"{name}.dcm").write_bytes(dicom_bytes(px, view=view))
    summary = score([str(folder)], str(tmp_path / "frontal"), tiny_model)
    assert (summary.errors, summary.not_frontal) == (3, 3) and "(3 of them not frontal views)" in summary.line()
    rows = {r["path"].rsplit("/", 1)[1]: r for r in read_table(str(tmp_path / "frontal")).to_pylist()}
    assert {n: r["view"] for n, r in rows.items()} == {
        "pa.dcm": "PA",
        "ap.dcm": "AP",
        "lateral.dcm": "LL",
        "oblique.dcm": "RAO",
        "decubitus.dcm": "LLD",
        "none.dcm": None,
    }
    for name in ("lateral.dcm", "oblique.dcm", "decubitus.dcm"):
        assert rows[name]["error"].startswith(f"not a frontal view: DICOM ViewPosition {rows[name]['view']} "), rows[
            name
        ]
        assert rows[name]["prob_covid"] is None
    same = rows["pa.dcm"]["prob_covid"]  # every file holds the same pixels
    assert all(
        rows[n]["error"] is None and rows[n]["prob_covid"] == pytest.approx(same)
        for n in ("pa.dcm", "ap.dcm", "none.dcm")
    )

    summary = score([str(folder)], str(tmp_path / "all"), tiny_model, all_views=True)
    assert (summary.files, summary.errors, summary.not_frontal) == (6, 0, 0)
    rows = read_table(str(tmp_path / "all")).to_pylist()
    assert all(r["error"] is None and r["prob_covid"] == pytest.approx(same) for r in rows)
    assert sorted(r["view"] or "-" for r in rows) == ["-", "AP", "LL", "LLD", "PA", "RAO"]


def test_jpegs_decoded_by_the_predictor_give_the_same_rows(ray_driver, mixed_folder, tiny_model, tmp_path):
    """The GPU path's JPEG route (bytes to the predictor, decoded there by device_decode), run on CPU:
    the same rows as the CPU path; truncated and EXIF-rotated JPEGs keep the CPU decoder's results."""
    import io

    from PIL import Image

    from cxr.score import device_jpeg_size
    from support.images import jpeg_bytes, xray_like

    folder, files = mixed_folder
    good = jpeg_bytes(xray_like(50, 40, seed=7))
    im = Image.open(io.BytesIO(good))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90: the CUDA decoder would not, so it must stay on the CPU path
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    extra = {
        "jpegs/rotated.jpg": (buf.getvalue(), None, (50, 40)),
        "jpegs/truncated.jpg": (good[: len(good) // 2], "truncated", None),
        "jpegs/big.jpg": (jpeg_bytes(xray_like(300, 260, seed=8)), None, (260, 300)),
    }
    for name, (data, _, _) in extra.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    files = {**files, **extra}
    assert device_jpeg_size(extra["jpegs/big.jpg"][0]) == (260, 300)
    assert (
        device_jpeg_size(extra["jpegs/rotated.jpg"][0]) is None
        and device_jpeg_size(extra["jpegs/truncated.jpg"][0]) is None
    )
    assert device_jpeg_size(files["good/a.png"][0]) is None
    summary = score([str(folder)], str(tmp_path / "scores"), tiny_model, device_jpeg=True, batch_size=4)
    check_table(read_table(str(tmp_path / "scores")), files, str(folder), tiny_model)
    assert summary.errors == sum(1 for _, e, _ in files.values() if e)


def test_device_jpeg_route_in_the_stages(mixed_folder, tiny_model):
    """Without Ray: with device_jpeg the decode task leaves good JPEGs undecoded (bytes in ``jpeg``) and the
    predictor decodes them itself, giving the rows the CPU route gives."""
    from cxr import storage
    from cxr.score import Predictor, decode_batch

    folder, files = mixed_folder
    batch = {"path": np.array([str(folder / n) for n in sorted(files)], dtype=object)}
    spec = load_checkpoint(tiny_model).info.preprocess.to_dict()
    settings = storage.s3_settings()
    cpu = decode_batch(batch, spec, settings)
    dev = decode_batch(batch, spec, settings, device_jpeg=True)
    jpeg_rows = [i for i, n in enumerate(sorted(files)) if n.endswith((".jpg", ".jpeg")) and files[n][1] is None]
    assert jpeg_rows and "jpeg" not in cpu
    assert [i for i, b in enumerate(dev["jpeg"]) if len(b)] == jpeg_rows
    assert not dev["image"][jpeg_rows].any() and cpu["image"][jpeg_rows].any()
    assert (dev["width"] == cpu["width"]).all() and (dev["height"] == cpu["height"]).all()
    predictor = Predictor(tiny_model, "run", 1, False, settings)
    want, got = predictor(cpu).to_pydict(), predictor(dev).to_pydict()
    assert got["error"] == want["error"] and got["prediction"] == want["prediction"]
    np.testing.assert_allclose(
        np.array(got["prob_covid"], dtype=float), np.array(want["prob_covid"], dtype=float), atol=1e-5
    )


def test_actors_asking_for_every_cpu_do_not_deadlock(ray_driver, mixed_folder, tiny_model, tmp_path):
    folder, files = mixed_folder
    for i in range(150):  # enough batches for Ray Data to want more actors
        (folder / "more" / f"{i:03d}.png").parent.mkdir(exist_ok=True)
        (folder / "more" / f"{i:03d}.png").write_bytes(png_bytes(xray_like(32, 32, seed=i)))
    # A manifest adds a read task; 64 actors x 0.5 CPU would fill this 2+1-CPU cluster and leave nothing for
    # the read, decode and write tasks (seen here with fixed pools: a silent hang). The pool's maximum is
    # kept (an autoscaling cluster could grow into it); Ray Data adds actors only within its budget.
    names = sorted(files) + [f"more/{i:03d}.png" for i in range(150)]
    pacsv.write_csv(pa.table({"path": names}), folder / "all.csv")
    summary = score(
        [str(folder / "all.csv")], str(tmp_path / "scores"), tiny_model, actors=64, cpus_per_actor=0.5, batch_size=2
    )
    assert summary.files == len(names) and summary.scored == len(names) - sum(1 for _, e, _ in files.values() if e)
    assert summary.plan["decode_share"] is None and summary.plan["actors"] == 64  # CPUs asked for: not measured


def test_score_s3_bucket_both_ways(ray_driver, s3_bucket, mixed_folder, tiny_model, tmp_path):
    bucket, client = s3_bucket
    folder, files = mixed_folder
    upload_tree(client, bucket, folder, "incoming/day1")
    model_uri = f"s3://{bucket}/models/tiny"
    upload_tree(client, bucket, __import__("pathlib").Path(tiny_model), "models/tiny")
    out = f"s3://{bucket}/scores/run1"
    summary = score([f"s3://{bucket}/incoming/day1"], out, model_uri)
    check_table(read_table(out), files, f"s3://{bucket}/incoming/day1", tiny_model)
    assert summary.files == len(files)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="scores/run1/")["Contents"]]
    assert any(k.endswith(".parquet") for k in keys) and "scores/run1/_summary.json" in keys


def test_manifest_csv_and_parquet(ray_driver, mixed_folder, tiny_model, tmp_path):
    folder, files = mixed_folder
    names = sorted(files)[:5]
    # relative entries resolve against the manifest's folder; a missing file becomes an error row
    pacsv.write_csv(pa.table({"path": names + ["good/missing.png"]}), folder / "manifest.csv")
    out = str(tmp_path / "from_csv")
    score([str(folder / "manifest.csv")], out, tiny_model)
    rows = {r["path"]: r for r in read_table(out).to_pylist()}
    assert set(rows) == {f"{folder}/{n}" for n in names + ["good/missing.png"]}
    assert rows[f"{folder}/good/missing.png"]["error"].startswith("read failed")

    pq.write_table(
        pa.table({"uri": [str(folder / n) for n in names], "site": ["a"] * len(names)}), tmp_path / "m.parquet"
    )
    out2 = str(tmp_path / "from_parquet")
    score([str(tmp_path / "m.parquet")], out2, tiny_model)
    assert sorted(read_table(out2)["path"].to_pylist()) == sorted(f"{folder}/{n}" for n in names)


def test_score_job_cli_exit_codes_and_no_secrets(ray_cluster, mixed_folder, tiny_model, tmp_path):
    folder, files = mixed_folder
    env = {"RAY_ADDRESS": ray_cluster.address, "AWS_SECRET_ACCESS_KEY": "sekrit-XYZ-0123456789"}
    out = tmp_path / "scores"
    ok = run_job("score.py", "--input", str(folder), "--output", str(out), "--model", tiny_model, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"scored {len(files)} files" in ok.stdout
    summary = json.loads(ok.stdout.strip().splitlines()[-1])["summary"]
    assert summary["errors"] == sum(1 for _, e, _ in files.values() if e)
    assert "sekrit-XYZ" not in ok.stdout + ok.stderr
    assert all(b"sekrit-XYZ" not in p.read_bytes() for p in out.iterdir())

    again = run_job("score.py", "--input", str(folder), "--output", str(out), "--model", tiny_model, env=env)
    assert again.returncode == 5 and "not empty" in again.stderr
    missing = run_job(
        "score.py", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2"), "--model", tiny_model, env=env
    )
    assert missing.returncode == 3 and "input not found" in missing.stderr
    (tmp_path / "badmodel").mkdir()
    (tmp_path / "badmodel" / "model.json").write_text("{not json")
    bad = run_job(
        "score.py",
        "--input",
        str(folder),
        "--output",
        str(tmp_path / "o3"),
        "--model",
        str(tmp_path / "badmodel"),
        env=env,
    )
    assert bad.returncode == 4 and "not valid JSON" in bad.stderr
    usage = run_job("score.py", "--output", str(tmp_path / "o4"), env=env)
    assert usage.returncode == 2
