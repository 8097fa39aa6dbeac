"""The packer under the faults real corpora and machines have: nothing lost, no traceback.

Every test checks the invariant packed + rejected = inputs, with a reason for each reject,
on real files, links, FIFOs and sockets, transcoding processes killed with SIGKILL, an S3
endpoint that never answers, a real tmpfs that fills up, and a real S3 server (moto) that
refuses uploads or loses its bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pytest

from dclr_dist.config import ShardConfig
from dclr_dist.shard import pack as pack_module
from dclr_dist.shard.__main__ import main
from dclr_dist.shard.pack import PackError, list_inputs, pack

CFG = ShardConfig(short_side=32, max_samples=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A real 8-frame H.264 mp4 (64x48): cheap to transcode, so the tests time the faults."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.mp4"
    rgb = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            frame = av.VideoFrame.from_ndarray(np.roll(rgb, 4 * i, axis=1), format="rgb24").reformat(format="yuv420p")
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)
    return path


@pytest.fixture(scope="module")
def long_video(tmp_path_factory, sample_videos) -> Path:
    """A real video that takes seconds to transcode: bikes.mp4's packets muxed 4 times (1000 frames)."""
    path = tmp_path_factory.mktemp("long") / "long.mp4"
    with av.open(str(sample_videos["bikes"])) as src:
        stream = src.streams.video[0]
        packets = [(bytes(p), p.pts, p.dts, p.is_keyframe) for p in src.demux(stream) if p.size]
        step = packets[-1][2] - packets[0][2] + packets[1][2] - packets[0][2]
        with av.open(str(path), "w", format="mp4") as out:
            copy = out.add_stream_from_template(stream)
            for r in range(4):
                for data, pts, dts, key in packets:
                    p = av.Packet(data)
                    p.pts, p.dts, p.time_base, p.stream, p.is_keyframe = (
                        pts + r * step,
                        dts + r * step,
                        stream.time_base,
                        copy,
                        key,
                    )
                    out.mux(p)
    return path


def _rejects(out: Path) -> dict[str, str]:
    return {r["source"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}


def _packed(out: Path) -> dict[str, dict]:
    """source -> record, from the shards index.json lists (checked against their size and sha256)."""
    import tarfile

    index = json.loads((out / "index.json").read_text())
    records = {}
    for shard in index["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
        with tarfile.open(out / shard["name"]) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    record = json.load(tar.extractfile(m))
                    records[record["source"]] = record
    return records


def _accounted(out: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Packed and rejected inputs; asserts the invariant index.json states."""
    index = json.loads((out / "index.json").read_text())
    packed, rejects = _packed(out), _rejects(out)
    assert index["samples"] == len(packed) and index["rejected"] == len(rejects)
    assert index["samples"] + index["rejected"] == index["inputs"]
    assert not set(packed) & set(rejects)
    return packed, rejects


# --------------------------------------------------------------------------- input trees


def test_input_tree_as_people_assemble_it(tmp_path, tiny):
    """Linked class folders and files are followed; every odd entry is a reject with its reason."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "Diving").mkdir(parents=True)
    shutil.copyfile(tiny, elsewhere / "Diving" / "d1.mp4")
    shutil.copyfile(tiny, elsewhere / "loose.mp4")
    root = tmp_path / "in"
    (root / "Archery" / "deeper").mkdir(parents=True)
    shutil.copyfile(tiny, root / "Archery" / "a1.mp4")
    shutil.copyfile(tiny, root / "Archery" / "deeper" / "a2.mp4")
    os.symlink(elsewhere / "Diving", root / "Diving")  # a class folder that is a link: was skipped, exit 0
    os.symlink(elsewhere / "loose.mp4", root / "Archery" / "linked.mp4")
    os.symlink(root / "Archery" / "a1.mp4", root / "Archery" / "again.mp4")  # the same file twice
    os.symlink(root / "Archery", root / "Archery" / "deeper" / "loop")  # a link back up: a loop
    os.symlink(root / "nowhere.mp4", root / "Archery" / "broken.mp4")
    (root / "Archery" / "empty.mp4").write_bytes(b"")
    (root / "Archery" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "Archery" / "._a1.mp4").write_bytes(b"\x00\x05\x16\x07")  # macOS AppleDouble
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    os.mkfifo(root / "Archery" / "pipe.mp4")  # opening it would block for ever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "Archery" / "sock.mp4"))
    shutil.copyfile(os.fsencode(tiny), os.fsencode(root / "Archery") + b"/caf\xe9.mp4")  # Latin-1, not UTF-8
    with open(os.fsencode(root / "Archery") + b"/d\xe9j\xe0 vu.mp4", "wb") as f:  # FFmpeg's error names it
        f.write(np.random.default_rng(0).bytes(3000))
    (root / "Empty class").mkdir()

    out = tmp_path / "out"
    try:
        index = pack(str(root), str(out), CFG, workers=2, progress=False).index
    finally:
        sock.close()
    packed, rejects = _accounted(out)

    assert set(packed) == {
        "Archery/a1.mp4",
        "Archery/deeper/a2.mp4",
        "Archery/linked.mp4",
        "Diving/d1.mp4",
        "Archery/caf\\xe9.mp4",
    }
    expected = {
        "Archery/again.mp4": "duplicate: the same file as Archery/a1.mp4",
        "Archery/deeper/loop": "symlink loop",
        "Archery/broken.mp4": f"file not found: a broken symbolic link (to {root / 'nowhere.mp4'})",
        "Archery/empty.mp4": "empty file (0 bytes)",
        "Archery/.DS_Store": "hidden: a hidden file",
        "Archery/._a1.mp4": "hidden: a hidden file",
        ".git": "hidden: a hidden folder, not read",
        "Archery/pipe.mp4": "not a regular file: a FIFO",
        "Archery/sock.mp4": "not a regular file: a socket",
        "Archery/d\\xe9j\\xe0 vu.mp4": "not a readable video container",
    }
    assert set(rejects) == set(expected), rejects
    for source, reason in expected.items():
        assert rejects[source].startswith(reason), (source, rejects[source])
    assert index["classes"] == ["Archery", "Diving", "Empty class"]  # the folder is the class
    assert packed["Diving/d1.mp4"]["label"] == 1 and packed["Archery/linked.mp4"]["class"] == "Archery"
    assert index["reject_reasons"]["hidden"] == 3


# --------------------------------------------------------------------------- manifests


def _videos(folder: Path, tiny: Path, names: list[str]) -> None:
    for name in names:
        shutil.copyfile(tiny, folder / name)


def test_manifest_as_a_spreadsheet_writes_it(tmp_path, tiny):
    """BOM, header case and spaces, CRLF, an unquoted comma, empty rows and cells: every row accounted for."""
    _videos(tmp_path, tiny, ["a.mp4", "b.mp4", "c.mp4", "d.mp4", "e.mp4", "f.mp4"])
    rows = [
        " Path,LABEL ,Split,scene",
        "a.mp4,Playing guitar,train,s1",
        'b.mp4,"Playing guitar, acoustic",train,s2',
        "c.mp4,Playing guitar, acoustic,train,s3",  # unquoted comma: shifted, and crashed the packer
        ",,,",  # a spreadsheet's empty row: not a row
        "e.mp4,Singing,,s5",  # no split: under --split it was in no packing
        "d.mp4,Singing,test,s6",
        "f.mp4,Singing,train,s7,,",
    ]  # trailing empty cells, as spreadsheets write them
    (tmp_path / "m.csv").write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode())
    out = tmp_path / "train"
    index = pack(str(tmp_path / "m.csv"), str(out), CFG, split="train", progress=False).index
    packed, rejects = _accounted(out)
    assert set(packed) == {"a.mp4", "b.mp4", "f.mp4"} and index["inputs"] == 5
    assert packed["b.mp4"]["class"] == "Playing guitar, acoustic" and packed["a.mp4"]["meta"] == {"scene": "s1"}
    assert rejects == {
        "c.mp4": "bad row: m.csv line 4 has 5 fields where the header has 4 (a ',' inside a value? quote the value)",
        "e.mp4": "no split: m.csv line 6 names none, and --split train packs the rows of split train",
    }
    assert index["classes"] == ["Playing guitar", "Playing guitar, acoustic", "Singing"]
    assert index["reject_reasons"] == {"bad row": 1, "no split": 1}
    # the test packing rejects the shifted row too: its split is unknown
    test = pack(str(tmp_path / "m.csv"), str(tmp_path / "test"), CFG, split="test", progress=False).index
    assert (test["samples"], test["rejected"]) == (1, 2) and test["classes"] == index["classes"]

    # ';'-separated (spreadsheets in many locales), a header with unnamed columns, JSONL with a BOM
    (tmp_path / "semi.csv").write_text("PATH;Label;;\na.mp4;x;;\nb.mp4;y; z;\n")
    inputs, _ = list_inputs(str(tmp_path / "semi.csv"))
    assert [i.problem for i in inputs] == [
        None,
        "bad row: semi.csv line 3 has a value in a column the header "
        "does not name (a ';' inside a value? quote the value)",
    ]
    (tmp_path / "m.jsonl").write_bytes(
        "\ufeff".encode() + b'{"Path": "a.mp4", " label": "x"}\n{"path": "b.mp4", "label": ["x"]}\n[1]\n'
    )
    inputs, classes = list_inputs(str(tmp_path / "m.jsonl"))
    assert classes == ["x"] and inputs[0].problem is None
    assert inputs[1].problem == 'bad row: m.jsonl line 2: label must be text, got ["x"]'
    assert inputs[2].problem == "bad row: m.jsonl line 3 is not a JSON object (found a list)"


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "path,label\na.mp4,caf\xe9\n".encode("cp1252"),
            "m.csv: line 2 is not UTF-8 (byte 0xe9); save the manifest as UTF-8",
        ),
        (b"path,label,Label\na.mp4,x,y\n", "m.csv: the header names the column 'label' twice (columns 2 and 3)"),
        (
            b"a.mp4,x\n",
            "m.csv: the header must name the columns path,label[,split]; missing label, path (first line: 'a.mp4,x')",
        ),
        (b'path,label\n"a.mp4,x\n', "m.csv: line 2: unexpected end of data; check the quotes on that line"),
        (
            b'path,label\na.mp4,"x\nb.mp4,y"\nc.mp4,z\n',
            "m.csv: line 2: a quoted value runs on to line 3, taking the rows between with it",
        ),
        (b"path,label\na.mp4,x\n", "m.csv: no inputs with split 'train' (it names no splits)"),
    ],
)
def test_manifest_refused_up_front_with_one_line(tmp_path, content, message, capsys):
    (tmp_path / "m.csv").write_bytes(content)
    assert main(["--input", str(tmp_path / "m.csv"), "--split", "train", "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- resume


def _corpus(root: Path, tiny: Path, n: int) -> Path:
    for k in range(n):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny, root / f"c{k % 2}" / f"v{k}.mp4")
    return root


def _interrupted(monkeypatch, corpus: Path, out: Path, cfg: ShardConfig) -> None:
    """Every shard published and recorded, then the run dies before index.json (injected)."""

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(pack_module, "_finish", die)
        with pytest.raises(KeyboardInterrupt):
            pack(str(corpus), str(out), cfg, progress=False)
    assert not (out / "index.json").exists() and (out / "_partial" / "shard-000002.tar.json").exists()


def test_resume_redoes_a_damaged_kept_shard(tmp_path, tiny, monkeypatch):
    corpus = _corpus(tmp_path / "in", tiny, 7)
    reference = tmp_path / "reference"
    pack(str(corpus), str(reference), CFG, progress=False)
    out = tmp_path / "out"
    _interrupted(monkeypatch, corpus, out, CFG)
    # what a power loss leaves of a shard renamed before its data reached the disk: zeros
    damaged = out / "shard-000001.tar"
    damaged.write_bytes(bytes(damaged.stat().st_size))
    result = pack(str(corpus), str(out), CFG, progress=False)
    assert result.resumed_shards == 1
    assert result.redone == (
        "shard-000001.tar does not hold the bytes that were written (sha256); packed it and the shards after it again"
    )
    _accounted(out)  # sizes and sha256 in index.json are the files'
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for p in reference.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name

    # a shard cut short between runs (a full disk, a copy that stopped): its size says so
    out2 = tmp_path / "out2"
    _interrupted(monkeypatch, corpus, out2, CFG)
    cut = out2 / "shard-000002.tar"
    cut.write_bytes(cut.read_bytes()[:1000])
    assert pack(str(corpus), str(out2), CFG, progress=False).redone.startswith("shard-000002.tar has 1000 bytes where ")
    assert (out2 / "index.json").read_bytes() == (reference / "index.json").read_bytes()


def test_changed_inputs_are_noticed_on_resume_and_after_finishing(tmp_path, tiny, monkeypatch, sample_videos):
    corpus = _corpus(tmp_path / "in", tiny, 7)
    out = tmp_path / "out"
    _interrupted(monkeypatch, corpus, out, CFG)
    state = json.loads((out / "_partial" / "shard-000000.tar.json").read_text())
    inputs = [i for i in list_inputs(str(corpus))[0]]
    order = np.random.default_rng(CFG.seed).permutation(len(inputs))
    changed = inputs[order[state["first_input"]]].source  # packed into the first shard
    shutil.copyfile(sample_videos["carphone_pristine"], corpus / changed)  # same path, new content
    size = (corpus / changed).stat().st_size
    with pytest.raises(PackError) as e:
        pack(str(corpus), str(out), CFG, progress=False)
    assert str(e.value) == (
        f"{changed} changed since the interrupted run packed it into shard-000000.tar "
        f"({tiny.stat().st_size} bytes then, {size} now); pass --overwrite to pack the "
        "current files"
    )

    finished = tmp_path / "finished"
    pack(str(corpus), str(finished), CFG, progress=False)
    assert pack(str(corpus), str(finished), CFG, progress=False).already_complete
    st = (corpus / changed).stat()
    os.utime(corpus / changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten, same size
    with pytest.raises(PackError, match="was packed from other contents of these inputs .* --overwrite"):
        pack(str(corpus), str(finished), CFG, progress=False)
    os.utime(corpus / changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    shard = finished / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:512])
    with pytest.raises(
        PackError,
        match=r"shard-000001.tar has 512 bytes where index.json says \d+: the packing "
        "was damaged after it finished; pass --overwrite",
    ):
        pack(str(corpus), str(finished), CFG, progress=False)


def test_shards_reach_the_disk_before_they_are_renamed_into_place(tmp_path, tiny, monkeypatch):
    synced, order = set(), []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    def record_replace(src, dst):
        order.append((str(dst), str(src) in synced))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    out = tmp_path / "out"
    pack(str(_corpus(tmp_path / "in", tiny, 5)), str(out), CFG, progress=False)
    shards = [(dst, was_synced) for dst, was_synced in order if dst.endswith(".tar")]
    assert [Path(d).name for d, _ in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all(was_synced for _, was_synced in shards)
    assert str(out) in synced  # the folder too, so the rename itself is durable


# --------------------------------------------------------------------------- dying and stalling transcoders


def _holding(proc: psutil.Process, path: str) -> psutil.Process | None:
    for child in proc.children(recursive=True):
        try:
            if any(f.path == path for f in child.open_files()):
                return child
        except psutil.Error:
            pass
    return None


def test_a_killed_transcoder_costs_one_input_not_the_run(tmp_path, tiny, long_video):
    corpus = _corpus(tmp_path / "in", tiny, 4)
    shutil.copyfile(long_video, corpus / "c0" / "killer.mp4")
    target = os.path.realpath(corpus / "c0" / "killer.mp4")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dclr_dist.shard",
            "--input",
            str(corpus),
            "--output",
            str(out),
            "--short-side",
            "32",
            "--workers",
            "2",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        packer, killed = psutil.Process(proc.pid), []
        deadline = time.monotonic() + 120
        while len(killed) < 2:  # the OOM killer's SIGKILL, twice: the first try and the retry
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            worker = _holding(packer, target)
            if worker is not None and worker.pid not in killed:
                worker.kill()
                killed.append(worker.pid)
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    packed, rejects = _accounted(out)
    assert len(packed) == 4 and set(rejects) == {"c0/killer.mp4"}
    assert rejects["c0/killer.mp4"] == (
        "transcoder died: the process transcoding it was killed by SIGKILL, twice (out of memory, or a crash in "
        "the decoder); to try it again, pack with fewer --workers into a new --output, or with --overwrite"
    )
    assert "rejected 1 inputs (1 transcoder died)" in stdout


def test_an_input_whose_read_never_returns_stops_the_run_and_the_next_run_packs_it(tmp_path, tiny, bucket, monkeypatch):
    """A hung read or an unreachable store says nothing about the video: no reject, the packing
    stops with the reason, and the same command packs it once the cause has passed."""
    import boto3

    moto = os.environ["AWS_ENDPOINT_URL"]
    # An S3 endpoint that takes the request and never answers: botocore would wait minutes.
    silent = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    _videos(tmp_path, tiny, ["a.mp4", "b.mp4", "c.mp4"])
    (tmp_path / "m.csv").write_text(f"path,label\na.mp4,x\n{bucket}/hangs.mp4,x\nb.mp4,y\nc.mp4,y\n")
    out = tmp_path / "out"
    cfg = ShardConfig(short_side=32, input_timeout=2, max_samples=1, shuffle=False)
    start = time.monotonic()
    try:
        with pytest.raises(PackError) as stopped:
            pack(str(tmp_path / "m.csv"), str(out), cfg, workers=2, progress=False)
    finally:
        silent.close()
    assert time.monotonic() - start < 30
    message = str(stopped.value)
    assert message.startswith(f"{bucket}/hangs.mp4: timed out: not transcoded within shard.input_timeout = 2 s")
    assert "re-run the same command; the 1 shards finished so far are kept" in message and "\n" not in message
    assert not (out / "index.json").exists() and not (out / "rejects.jsonl").exists()

    # The store is back (and holds the video): the same command resumes and packs every input.
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
    boto3.client("s3").upload_file(str(tmp_path / "a.mp4"), bucket.removeprefix("s3://"), "hangs.mp4")
    result = pack(str(tmp_path / "m.csv"), str(out), cfg, workers=2, progress=False)
    assert result.resumed_shards == 1 and result.index["samples"] == 4 and result.index["rejected"] == 0


# --------------------------------------------------------------------------- where the output goes


def test_output_that_is_a_file_or_inside_the_input_is_refused(tmp_path, tiny, capsys):
    corpus = _corpus(tmp_path / "in", tiny, 2)
    (tmp_path / "file").write_text("x")
    for output, message in (
        (tmp_path / "file", f"error: {tmp_path / 'file'}: is a file, not a folder; choose another --output\n"),
        (
            corpus / "out",
            f"error: {corpus / 'out'}: inside the input folder {corpus}, so the next "
            "run would read its shards as videos; choose an --output outside it\n",
        ),
    ):
        assert main(["--input", str(corpus), "--output", str(output)]) == 1
        assert capsys.readouterr().err == message
    assert not (corpus / "out").exists()


def _in_tmpfs(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) as root of its own user and mount namespace, where mounting a tmpfs is allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1): cannot mount a small tmpfs without root")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are off here: {probe.stderr.decode().strip()}")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)


def test_full_disk_and_read_only_output_are_one_line_errors_and_the_rerun_resumes(tmp_path, tiny):
    corpus = _corpus(tmp_path / "in", tiny, 6)
    reference = tmp_path / "reference"
    pack(str(corpus), str(reference), ShardConfig(short_side=32, max_samples=1), progress=False)
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir()
    pack_cmd = (
        f"{sys.executable} -m dclr_dist.shard --input {corpus} --output {disk}/out --short-side 32 "
        f"--max-samples 1 --workers 1 --no-progress"
    )
    r = _in_tmpfs(f"""
        mount -t tmpfs -o size=24k tmpfs {disk} || exit 90
        {pack_cmd} 2> {tmp_path}/full.err; echo "exit $?" >> {tmp_path}/full.err
        ls -A {disk}/out > {tmp_path}/left.txt
        mount -o remount,size=4m {disk} && {pack_cmd} && cp -r {disk}/out {copy}
        mount -o remount,ro {disk} && {pack_cmd} --output {disk}/other 2> {tmp_path}/ro.err
        echo "exit $?" >> {tmp_path}/ro.err
    """)
    assert r.returncode == 0, r.stderr
    full = (tmp_path / "full.err").read_text()
    assert full.startswith(
        f"error: {disk}/out: No space left on device while writing the shards; free some "
        "space, then re-run the same command: the shards finished so far are kept\n"
    ), full
    assert full.endswith("exit 1\n") and full.count("\n") == 2
    left = (tmp_path / "left.txt").read_text().split()
    assert "shard-000000.tar" in left and not [n for n in left if n.endswith(".tmp")], left  # no half shard left
    assert "kept" in r.stdout  # the re-run with room resumed
    for p in reference.iterdir():
        assert (copy / p.name).read_bytes() == p.read_bytes(), p.name
    ro = (tmp_path / "ro.err").read_text()
    assert ro == f"error: {disk}/other: cannot create the output folder (Read-only file system)\nexit 1\n", ro


# --------------------------------------------------------------------------- S3


def test_s3_upload_refused_or_bucket_gone_is_one_line(tmp_path, tiny, bucket, capsys):
    import boto3

    corpus = _corpus(tmp_path / "in", tiny, 3)
    name = bucket.removeprefix("s3://")
    s3 = boto3.client("s3")
    s3.put_bucket_policy(
        Bucket=name,
        Policy=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:PutObject",
                        "Resource": f"arn:aws:s3:::{name}/x/shard-*",
                    }
                ],
            }
        ),
    )
    argv = ["--input", str(corpus), "--short-side", "32", "--workers", "1", "--no-progress", "--output"]
    assert main([*argv, f"{bucket}/x"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"error: {bucket}/x/shard-000000.tar: upload failed (403): access denied; check "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that the bucket policy allows s3:PutObject, "
            "then re-run the same command to resume"
        )
        and err.count("\n") == 1
    ), err
    s3.delete_bucket_policy(Bucket=name)

    def delete_bucket_once_the_run_has_begun():
        while True:
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]
            if "y/_partial/run.json" in keys:
                break
            time.sleep(0.01)
        for key in keys:
            s3.delete_object(Bucket=name, Key=key)
        s3.delete_bucket(Bucket=name)

    deleter = threading.Thread(target=delete_bucket_once_the_run_has_begun, daemon=True)
    deleter.start()
    assert main([*argv, f"{bucket}/y"]) == 1  # the workers start slower than the bucket goes
    deleter.join(timeout=60)
    err = capsys.readouterr().err
    assert err == (
        f"error: {bucket}/y/shard-000000.tar: upload failed (NoSuchBucket): the bucket does not exist "
        "(deleted while packing?); create it, then re-run the same command to resume\n"
    ), err
