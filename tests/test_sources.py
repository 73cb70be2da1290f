"""Tests for cxr.sources on the driver side: listing folders and S3 prefixes, manifests, de-duplication.

``table_dataset`` needs Ray and is covered by the scoring tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr.sources import InputError, input_paths, list_images, read_manifest, rows_per_block
from support.images import IGNORED, mixed_files, write_files
from support.s3 import upload_tree


@pytest.fixture
def tree(tmp_path) -> tuple[Path, list[str]]:
    """The mixed tree (good and broken images of every kind, plus IGNORED files) and its image names."""
    root = write_files(tmp_path / "images", mixed_files())
    (root / ".hidden.png").write_bytes(b"editor swap file")
    return root, sorted(mixed_files())


def test_list_images_local(tree):
    root, names = tree
    found = list_images(str(root))
    assert found == sorted(str(root / n) for n in names)
    assert found == sorted(found)
    assert all(Path(p).is_absolute() for p in found)
    # Upper-case extension, nested folders, extension-less DICOM; files that only look like images by
    # name are inputs too (errors are reported per file later).
    for name in ("good/rgb.PNG", "good/nested/deeper/b.jpg", "good/IM000001", "bad/text.jpg"):
        assert str(root / name) in found
    for name in IGNORED:
        assert (root / name).is_file() and str(root / name) not in found
    assert str(root / ".hidden.png") not in found
    assert list_images(str(root) + "/") == found
    assert list_images("file://" + str(root)) == found


def test_list_images_relative_path_gives_absolute(tree, monkeypatch):
    root, names = tree
    monkeypatch.chdir(root.parent)
    assert list_images("images/good/nested") == [str(root / "good/nested/deeper/b.jpg")]


def test_list_images_single_file(tree):
    root, _ = tree
    assert list_images(str(root / "good" / "a.png")) == [str(root / "good" / "a.png")]
    assert list_images(str(root / "good" / "IM000001")) == [str(root / "good" / "IM000001")]


def test_list_images_missing(tmp_path):
    with pytest.raises(InputError, match="input not found"):
        list_images(str(tmp_path / "nope"))


def test_list_images_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert list_images(str(tmp_path / "empty")) == []


def test_list_images_s3(tree, s3_bucket):
    root, names = tree
    bucket, client = s3_bucket
    upload_tree(client, bucket, root, "incoming/day1")
    prefix = f"s3://{bucket}/incoming/day1"
    found = list_images(prefix)
    assert found == sorted(f"{prefix}/{n}" for n in names)
    # Same relative names as the local listing.
    local = list_images(str(root))
    assert [p[len(prefix) + 1 :] for p in found] == [p[len(str(root)) + 1 :] for p in local]
    assert list_images(prefix + "/") == found
    assert list_images(f"{prefix}/good/a.png") == [f"{prefix}/good/a.png"]
    with pytest.raises(InputError, match="input not found"):
        list_images(f"s3://{bucket}/incoming/day2")


# ------------------------------------------------------------------ manifests


def _csv(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_read_manifest_csv(tmp_path):
    lists = tmp_path / "lists"
    uri = _csv(
        lists / "batch.csv",
        "path,label\n"
        "sub/a.png,1\n"
        "/data/abs/b.png,0\n"
        "file:///data/abs/c.dcm,0\n"
        ",1\n"
        "s3://bucket/key/d.jpg,1\n"
        "  spaced.png  ,0\n"
        "notes.txt,0\n",
    )
    got = read_manifest(uri)
    assert isinstance(got, pa.Array) and got.type == pa.string()
    assert got.to_pylist() == [
        f"{lists}/sub/a.png",
        "/data/abs/b.png",
        "/data/abs/c.dcm",
        "",
        "s3://bucket/key/d.jpg",
        f"{lists}/spaced.png",
        f"{lists}/notes.txt",  # a manifest is taken as given, whatever the extension
    ]


def test_read_manifest_csv_uri_column_numeric_names(tmp_path):
    # Names that look like numbers must stay strings (no "1.0"), and "uri" works as well as "path".
    uri = _csv(tmp_path / "m.csv", "id,uri\n1,001\n2,17\n")
    assert read_manifest(uri).to_pylist() == [f"{tmp_path}/001", f"{tmp_path}/17"]


def test_read_manifest_parquet(tmp_path):
    table = pa.table(
        {
            "uri": ["x/a.png", None, "/abs/b.png", "file:///abs/c.png", "s3://b/k/d.png", ""],
            "label": [1, 0, 1, 0, 1, 0],
        }
    )
    path = tmp_path / "m" / "batch.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    assert read_manifest(str(path)).to_pylist() == [
        f"{tmp_path}/m/x/a.png",
        "",
        "/abs/b.png",
        "/abs/c.png",
        "s3://b/k/d.png",
        "",
    ]


def test_read_manifest_prefers_path_column(tmp_path):
    path = tmp_path / "both.parquet"
    pq.write_table(pa.table({"uri": ["/u.png"], "path": ["/p.png"]}), path)
    assert read_manifest(str(path)).to_pylist() == ["/p.png"]


def test_read_manifest_without_known_column(tmp_path):
    csv = _csv(tmp_path / "m.csv", "filename,label\na.png,1\n")
    with pytest.raises(InputError) as err:
        read_manifest(csv)
    assert "path" in str(err.value) and "uri" in str(err.value)
    assert "columns: filename, label" in str(err.value)

    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.png"]}), parquet)
    with pytest.raises(InputError, match=r"no column named.*\(columns: image\)"):
        read_manifest(str(parquet))


def test_read_manifest_missing_or_broken(tmp_path):
    with pytest.raises(InputError, match="manifest not found"):
        read_manifest(str(tmp_path / "none.csv"))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet")
    with pytest.raises(InputError, match="cannot read manifest"):
        read_manifest(str(broken))


def test_read_manifest_s3_relative_entries(s3_bucket):
    bucket, client = s3_bucket
    client.put_object(Bucket=bucket, Key="lists/today.csv", Body=b"path\nimgs/a.png\ns3://other/b.png\n")
    assert read_manifest(f"s3://{bucket}/lists/today.csv").to_pylist() == [
        f"s3://{bucket}/lists/imgs/a.png",
        "s3://other/b.png",
    ]


# ------------------------------------------------------------------ input_paths


def test_input_paths_dedupes_in_first_order(tree, tmp_path, caplog):
    root, names = tree
    listed = list_images(str(root / "good"))
    manifest = _csv(
        tmp_path / "m.csv",
        "path\n"
        f"{root}/bad/empty.png\n"
        f"{root}/good/a.png\n"  # already listed from the folder
        f"{root}/bad/empty.png\n"  # named twice in the manifest
        "extra/new.png\n",
    )
    with caplog.at_level(logging.WARNING, logger="cxr.sources"):
        got = input_paths([str(root / "good"), manifest, str(root / "good" / "c.jpeg")])
    assert isinstance(got, pa.Array)
    assert got.to_pylist() == listed + [f"{root}/bad/empty.png", f"{tmp_path}/extra/new.png"]
    assert "3 entries named a file already named" in caplog.text


def test_input_paths_nothing_found(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no PNG, JPEG or DICOM files found in .*empty"):
        input_paths([str(tmp_path / "empty")])
    with pytest.raises(InputError, match="input not found"):
        input_paths([str(tmp_path / "missing")])


def test_rows_per_block_bounds():
    assert rows_per_block(0) == 16
    assert rows_per_block(1) == 16
    assert rows_per_block(16_000) == 16
    assert rows_per_block(16_001) == 17
    assert rows_per_block(1_000_000) == 1000
    assert rows_per_block(2_048_000) == 2048
    assert rows_per_block(10**8) == 2048
    for n in (5, 999, 50_000, 3_000_000, 10**7):
        assert 16 <= rows_per_block(n) <= 2048
        assert -(-n // rows_per_block(n)) <= max(1000, -(-n // 2048))  # at most ~1000 blocks unless capped


def test_io_errors_are_described_in_one_line_without_credentials():
    from cxr.storage import describe_error

    assert (
        describe_error(OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation:"))
        == "OSError: AWS Error SERVICE_UNAVAILABLE during GetObject operation"
    )
    assert (
        describe_error(OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce\n  your request rate."))
        == "OSError: AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate."
    )
    leaky = OSError(
        "AWS Error ACCESS_DENIED during HeadObject operation: The AWS Access Key Id you provided AKIAEXAMPLE"
    )
    assert describe_error(leaky) == "OSError: AWS Error ACCESS_DENIED during HeadObject operation: The [redacted]"
    signed = FileNotFoundError("https://b.s3/x?X-Amz-Credential=AKIAEXAMPLE%2F2026&X-Amz-Signature=abc")
    assert "AKIA" not in describe_error(signed) and describe_error(signed).startswith(
        "FileNotFoundError: https://b.s3/x?"
    )
    assert len(describe_error(OSError("x" * 1000))) == len("OSError: ") + 300
