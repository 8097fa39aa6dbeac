"""Checkpoint settings and the S3 filesystem Ray writes checkpoints with (moto's S3 server).

The checkpoints themselves (by time, uploaded in the background, resumed) are exercised by
tests/test_train.py on a real Ray cluster.
"""

from __future__ import annotations

import uuid

import pytest

from dclr_dist import storage
from dclr_dist.config import ConfigError, load_config


def test_pyarrow_filesystem_signs_for_the_buckets_region_not_the_configured_one(s3_endpoint, monkeypatch):
    import boto3

    from dclr_dist.storage import pyarrow_filesystem

    # boto3 follows S3's region redirects and pyarrow does not: a bucket outside the
    # configured region (here AWS_REGION, and AWS_DEFAULT_REGION=us-east-1 from the fixture)
    # used to pass every check and fail at the first checkpoint.
    name = f"eu-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    path, fs = pyarrow_filesystem(f"s3://{name}/runs")
    assert (path, fs.region) == (f"{name}/runs", "eu-west-3")
    with fs.open_output_stream(f"{path}/probe.txt") as f:
        f.write(b"written by pyarrow")
    assert storage.read_bytes(f"s3://{name}/runs/probe.txt") == b"written by pyarrow"


def test_ray_storage_of_a_missing_bucket_is_a_one_line_error(s3_endpoint):
    from dclr_dist.storage import pyarrow_filesystem

    with pytest.raises(
        storage.StorageError,
        match=r"^s3://no-such-bucket-x/runs: bucket 'no-such-bucket-x' does "
        r"not exist\. Create it first",
    ):
        pyarrow_filesystem("s3://no-such-bucket-x/runs")


@pytest.mark.parametrize(
    "override, message",
    [
        ("checkpoint.minutes=0", "checkpoint.minutes must be > 0 and at most a week (10080), or null, got 0.0"),
        ("checkpoint.minutes=-5", "checkpoint.minutes must be > 0 and at most a week (10080), or null, got -5.0"),
        ("checkpoint.every=-1", "checkpoint.every must be >= 0 (0: not by epochs), got -1"),
    ],
)
def test_checkpoint_interval_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])
    cfg = load_config(None, ["checkpoint.every=0", "checkpoint.minutes=30"]).checkpoint
    assert (cfg.every, cfg.minutes) == (0, 30.0)
