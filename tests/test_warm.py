"""`adpipe warm`: commands run on a pre-imported server give the same output, files, exit status and
run history as cold ones, and a command whose caller goes away is stopped."""
import json
import os
import signal
import subprocess
import sys

import dagster as dg
import yaml

from tests.tiny_project import BIN, ROOT, TINY, write_params

ENV = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "ADPIPE_SERVER")}


def warm(script: str, cwd) -> subprocess.CompletedProcess:
    """`adpipe warm -- python -c script`: the script's own `adpipe` calls go to the warm server."""
    return subprocess.run([str(BIN / "adpipe"), "warm", "--", sys.executable, "-c", script], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def test_warm_commands_behave_like_cold_ones(tmp_path):
    params = write_params(tmp_path, categories=["synthetic/granite"], methods=["mean_image"])
    script = f"""
import json, os, subprocess, time
adpipe = {str(BIN / "adpipe")!r}
out = {{"server": os.environ.get("ADPIPE_SERVER", "")}}
start = time.perf_counter()
done = subprocess.run([adpipe, "--params", {str(params)!r}, "partitions"], capture_output=True, text=True)
out["partitions"] = [done.returncode, done.stdout, time.perf_counter() - start]
done = subprocess.run([adpipe, "--params", {str(params)!r}, "materialize", "--select", "dataset,defect_bank"],
                      capture_output=True, text=True)
out["materialize"] = [done.returncode, done.stderr[-2000:]]
done = subprocess.run([adpipe, "--params", "missing.yaml", "partitions"], capture_output=True, text=True)
out["bad"] = [done.returncode, done.stderr]
print(json.dumps(out))
"""
    done = warm(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["server"].endswith("server.sock")
    code, stdout, seconds = out["partitions"]
    assert code == 0 and stdout == "categories: synthetic/granite\nmethods: mean_image\n"
    assert out["materialize"][0] == 0, out["materialize"][1]
    assert (tmp_path / "data" / "defects" / "synthetic" / "granite").is_dir()  # written where the caller is
    # the run went into the project's history, as a cold `adpipe` would record it
    instance = dg.DagsterInstance.from_config(str(tmp_path / ".dagster_home"))
    assert [r.status.value for r in instance.get_runs()] == ["SUCCESS"]
    # errors and exit status reach the caller
    assert out["bad"][0] == 1 and "missing.yaml: no params file" in out["bad"][1]
    # the server is gone with the command, and its socket with it
    assert not os.path.exists(out["server"])


def test_without_a_server_adpipe_runs_the_command_itself(tmp_path):
    params = write_params(tmp_path)
    done = subprocess.run([str(BIN / "adpipe"), "--params", str(params), "partitions"], cwd=tmp_path,
                          env={**ENV, "ADPIPE_SERVER": str(tmp_path / "gone.sock")}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("categories: synthetic/fabric")


def test_warm_ends_when_started_with_sigterm_ignored(tmp_path):
    """A supervisor or a test runner's worker may hand SIGTERM down as ignored: `warm` still stops its
    server (with SIGTERM) when the command is done, instead of waiting for it forever."""
    done = subprocess.run([str(BIN / "adpipe"), "warm", "--", "true"], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=120, preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_command_whose_caller_is_killed_is_stopped(tmp_path):
    """kill -9 of a warm `adpipe materialize` in the middle of training: its process on the server
    goes too, instead of training on unseen."""
    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump({**TINY, "categories": ["synthetic/granite"], "methods": ["pfm"],
                                    "method_config": {"pfm": {"epochs": 100000, "image_size": 64}}}))
    work = tmp_path / "work"
    work.mkdir()
    script = f"""
import psutil, signal, subprocess, sys, time
client = subprocess.Popen([{str(BIN / "adpipe")!r}, "--params", {str(slow)!r}, "materialize",
                           "--select", "dataset,defect_bank,model"], cwd={str(work)!r},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

def others():  # processes working in `work` besides the client: the server's child running the command
    found = []
    for p in psutil.process_iter(["pid", "cwd"]):
        if p.info["cwd"] == {str(work)!r} and p.info["pid"] != client.pid:
            found.append(p.info["pid"])
    return found

deadline = time.time() + 120
while not others():
    assert time.time() < deadline and client.poll() is None, "the command never started on the server"
    time.sleep(0.2)
time.sleep(5)  # into the training
client.send_signal(signal.SIGKILL)
client.wait()
deadline = time.time() + 30
while others() and time.time() < deadline:
    time.sleep(0.2)
print("left:", others())
"""
    done = warm(script, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "left: []"
