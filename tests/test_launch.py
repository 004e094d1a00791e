"""Tests for launch/: the TPU pod launcher's commands and the local launcher.

They run the scripts as a user would, in subprocesses, with fake checkouts,
fake `gcloud` and fake interpreters; nothing imports jax or needs a cloud.
"""

import json
import os
import shlex
import socket
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.py")
LOCAL = os.path.join(REPO, "launch", "local.py")
LOCAL_SH = os.path.join(REPO, "launch", "local_multiprocess.sh")
GIN_FILE = "gin_configs/paper/pretrain_pause_130m.gin"
MODEL_DIR = "gs://bucket/run"


def _write(path, text="", mode=0o644):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  os.chmod(path, mode)


@pytest.fixture
def checkout(tmp_path):
  """A minimal pause_flax checkout: setup.py, the package, gin files."""
  root = tmp_path / "checkout"
  _write(str(root / "setup.py"))
  _write(str(root / "README.md"))
  _write(str(root / "pause_flax" / "__init__.py"))
  _write(str(root / "pause_flax" / "__pycache__" / "x.cpython-311.pyc"))
  _write(str(root / GIN_FILE), "include 'gin_configs/models/130m.gin'\n")
  _write(str(root / "gin_configs" / "models" / "130m.gin"))
  return str(root)


def _tpu_pod(*args, env=None):
  return subprocess.run(
      [sys.executable, TPU_POD, *args], capture_output=True, text=True, env=env, check=False
  )


def _up_dry_run(checkout, accelerator_type, zone, *extra):
  result = _tpu_pod(
      "up", "--name=pause-130m", f"--zone={zone}", f"--accelerator-type={accelerator_type}",
      f"--source-dir={checkout}", f"--gin-file={GIN_FILE}", f"--model-dir={MODEL_DIR}",
      "--dry-run", *extra,
  )
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def _flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def _ssh_lines(lines):
  return [argv for argv in lines if argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]


def _train_argv(run_line):
  """The training command inside a run line's --command, as the worker parses it."""
  remote = shlex.split(_flag(run_line, "command"))
  start = remote.index("nohup") + 1
  return remote[start:remote.index(">>", start)]


@pytest.mark.parametrize(
    "accelerator_type, workers",
    [("v4-8", 1), ("v4-32", 4), ("v5litepod-8", 1), ("v5litepod-16", 4), ("v5p-128", 16),
     ("v6e-256", 64), ("v3-32", 4)],
)
def test_dry_run_logs_one_fetch_per_worker(accelerator_type, workers, tmp_path):
  logs_dir = str(tmp_path / "logs")
  result = _tpu_pod(
      "logs", "--name=t", "--zone=us-central2-b", f"--accelerator-type={accelerator_type}",
      f"--logs-dir={logs_dir}", "--dry-run",
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == shlex.join(["mkdir", "-p", logs_dir])
  assert len(lines) == 1 + workers
  for i, line in enumerate(lines[1:]):
    argv = shlex.split(line)
    assert _flag(argv, "worker") == str(i)
    assert argv[-2:] == [">", os.path.join(logs_dir, f"worker-{i}.log")]


def test_up_dry_run_v4_32(checkout):
  lines = _up_dry_run(checkout, "v4-32", "us-central2-b")
  create = lines[0]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pause-130m"]
  assert _flag(create, "accelerator-type") == "v4-32"
  assert _flag(create, "zone") == "us-central2-b"
  assert _flag(create, "version") == "tpu-ubuntu2204-base"
  assert "--spot" not in create

  ship = lines[1]
  assert "tar" in ship and ship[ship.index("tar") + 1] == "-czf"
  scp = ship[ship.index("gcloud"):]
  assert scp[3:5] == ["tpu-vm", "scp"] and _flag(scp, "worker") == "all"
  install, run = _ssh_lines(lines)
  assert _flag(install, "worker") == "all"
  assert "pip install" in _flag(install, "command")
  assert "jax[tpu]" in _flag(install, "command")
  assert _flag(run, "worker") == "all"
  assert _flag(run, "zone") == "us-central2-b"
  train = _train_argv(run)
  assert train[1:3] == ["-m", "pause_flax.train"]
  assert f"--gin_file={GIN_FILE}" in train
  assert f'--gin.MODEL_DIR="{MODEL_DIR}"' in train
  assert len(lines) == 4


def test_up_dry_run_v5litepod_16_queued_spot(checkout):
  lines = _up_dry_run(
      checkout, "v5litepod-16", "us-west4-a", "--queued", "--spot", "--project=my-proj",
      "--tfds-data-dir=gs://bucket/tfds", "--gin=TRAIN_STEPS=100", "--",
      "--gin.BATCH_SIZE=256",
  )
  create = lines[0]
  assert create[3:6] == ["queued-resources", "create", "pause-130m"]
  assert _flag(create, "node-id") == "pause-130m"
  assert _flag(create, "accelerator-type") == "v5litepod-16"
  assert _flag(create, "runtime-version") == "v2-alpha-tpuv5-lite"
  assert _flag(create, "zone") == "us-west4-a"
  assert _flag(create, "project") == "my-proj"
  assert "--spot" in create
  assert "queued-resources describe pause-130m" in shlex.join(lines[1])
  assert "ACTIVE" in shlex.join(lines[1])

  install, run = _ssh_lines(lines)
  assert _flag(install, "worker") == "all" and _flag(run, "worker") == "all"
  assert all(_flag(argv, "project") == "my-proj" for argv in lines if argv[0] == "gcloud")
  train = _train_argv(run)
  assert train[-4:] == [
      f'--gin.MODEL_DIR="{MODEL_DIR}"',
      '--gin.TFDS_DATA_DIR="gs://bucket/tfds"',
      "--gin.TRAIN_STEPS=100",
      "--gin.BATCH_SIZE=256",
  ]
  assert f"--gin_file={GIN_FILE}" in train
  assert "TFDS_DATA_DIR=gs://bucket/tfds" in shlex.split(_flag(run, "command"))


def test_install_dry_run_unpacks_and_installs_the_copied_tarball(checkout):
  install = _flag(_ssh_lines(_up_dry_run(checkout, "v4-32", "us-central2-b"))[0], "command")
  assert "tar -xzf ~/pause_flax_src.tar.gz -C ~/pause_flax" in install
  assert install.endswith("--reinstall-package pause-flax 'jax[tpu]' ~/pause_flax")


def test_install_with_package_ships_only_gin_files(checkout):
  spec = "git+https://github.com/example/pause_flax@v0.1.0"
  lines = _up_dry_run(checkout, "v4-32", "us-central2-b", f"--package={spec}")
  ship = lines[1]
  assert ship[ship.index("gcloud") - 1] == "gin_configs;"
  assert _flag(_ssh_lines(lines)[0], "command").endswith(f"'jax[tpu]' {spec}")


def test_delete_dry_run():
  tpu_vm = _tpu_pod("delete", "--name=t", "--zone=us-central2-b", "--dry-run")
  expected = "gcloud compute tpus tpu-vm delete t --zone=us-central2-b --quiet"
  assert tpu_vm.stdout.split() == expected.split()
  queued = _tpu_pod("delete", "--name=t", "--zone=us-central2-b", "--queued", "--dry-run")
  assert queued.stdout.split()[3:6] == ["queued-resources", "delete", "t"]
  assert "--force" in queued.stdout


@pytest.fixture
def fake_pod(tmp_path):
  """A `gcloud` on PATH that runs ssh --command locally, with HOME set to a fake worker's.

  scp copies into that HOME and records its source's directory and mode there.
  With FAKE_GCLOUD_EXIT0 set, gcloud exits 0 whatever the command did.
  """
  home = tmp_path / "worker_home"
  bin_dir = tmp_path / "bin"
  _write(
      str(bin_dir / "gcloud"),
      '#!/usr/bin/env bash\n'
      'if [ "$4" = scp ]; then dir=$(dirname "$5")\n'
      '  echo "$dir $(stat -c %a "$dir")" > "$FAKE_HOME/scp_source_dir"\n'
      '  exec cp "$5" "$FAKE_HOME/${6#*:}"; fi\n'
      'for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}";; esac; done\n'
      'if [ -n "${cmd:-}" ]; then HOME="$FAKE_HOME" bash -c "$cmd"; rc=$?\n'
      '  [ -n "${FAKE_GCLOUD_EXIT0:-}" ] && exit 0; exit $rc; fi\n',
      0o755,
  )
  _write(
      str(home / "pause_flax_venv" / "bin" / "python"),
      f"#!{sys.executable}\n"
      "import json, os, sys, time\n"
      "record = {'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
      "          'tfds': os.environ.get('TFDS_DATA_DIR'),\n"
      "          'libtpu': os.environ.get('LIBTPU_INIT_ARGS'),\n"
      "          'odd': os.environ.get('ODD')}\n"
      "print('training', flush=True)\n"
      "json.dump(record, open(os.path.expanduser('~/record.json'), 'w'))\n"
      "time.sleep(60)\n",
      0o755,
  )
  os.makedirs(home / "pause_flax")
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_HOME": str(home)}
  return home, env


def _wait_for(path, timeout=20.0):
  deadline = time.monotonic() + timeout
  while not os.path.exists(path):
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.1)


def test_run_and_stop_through_a_shell(checkout, fake_pod):
  """The run command survives both levels of shell quoting and runs detached."""
  home, env = fake_pod
  args = [
      "--name=t", "--zone=us-central2-b", f"--source-dir={checkout}", f"--gin-file={GIN_FILE}",
      f"--model-dir={MODEL_DIR}", "--tfds-data-dir=gs://bucket/tfds",
      "--gin=MIXTURE_OR_TASK_NAME='c4_pause pretrain'", "--check-seconds=1",
      "--env=LIBTPU_INIT_ARGS=--a=1 --b=2", "--env=ODD=it's \"$HOME\" $(false); x",
  ]
  result = _tpu_pod("run", *args, "--", "--gin.X=[1, 2]", env=env)
  assert result.returncode == 0, result.stderr
  _wait_for(home / "record.json")
  with open(home / "record.json", encoding="utf-8") as f:
    record = json.load(f)
  assert record["argv"] == [
      "-m", "pause_flax.train", f"--gin_file={GIN_FILE}", f'--gin.MODEL_DIR="{MODEL_DIR}"',
      '--gin.TFDS_DATA_DIR="gs://bucket/tfds"',
      "--gin.MIXTURE_OR_TASK_NAME='c4_pause pretrain'", "--gin.X=[1, 2]",
  ]
  assert record["cwd"] == str(home / "pause_flax")
  assert record["tfds"] == "gs://bucket/tfds"
  # --env values reach the process as typed, through ssh's remote shell.
  assert record["libtpu"] == "--a=1 --b=2"
  assert record["odd"] == 'it\'s "$HOME" $(false); x'
  logs = os.listdir(home / "pause_flax_logs")
  assert "train.pid" in logs and any(name.startswith("worker-") for name in logs)

  again = _tpu_pod("run", *args, env=env)
  assert again.returncode != 0 and "already running" in again.stderr

  stop = _tpu_pod("stop", "--name=t", "--zone=us-central2-b", env=env)
  assert stop.returncode == 0, stop.stderr
  assert not os.path.exists(home / "pause_flax_logs" / "train.pid")


def _fake_python3(fake_pod, exit_status):
  """A `python3` for the install step's remote side that logs its arguments."""
  home, env = fake_pod
  bin_dir = env["PATH"].split(":")[0]
  _write(os.path.join(bin_dir, "python3"),
         f'#!/usr/bin/env bash\necho "$*" >> "$HOME/python3_calls"\nexit {exit_status}\n', 0o755)
  tmp = home.parent / "local_tmp"
  os.makedirs(tmp)
  return {**env, "TMPDIR": str(tmp)}, tmp


def test_install_ships_a_private_tarball_and_removes_it(checkout, fake_pod):
  home, _ = fake_pod
  env, tmp = _fake_python3(fake_pod, 0)
  result = _tpu_pod("install", "--name=t", "--zone=us-central2-b", f"--source-dir={checkout}",
                    env=env)
  assert result.returncode == 0, result.stderr
  with open(home / "scp_source_dir", encoding="utf-8") as f:
    source_dir, mode = f.read().split()
  assert os.path.dirname(source_dir) == str(tmp) and mode == "700"
  assert os.listdir(tmp) == []  # The private directory is gone.
  with tarfile.open(home / "pause_flax_src.tar.gz") as archive:
    names = set(archive.getnames())
  assert {"setup.py", "README.md", "pause_flax/__init__.py", GIN_FILE} <= names
  assert not any("__pycache__" in name for name in names)
  assert os.path.isfile(home / "pause_flax" / GIN_FILE)  # Unpacked on the worker.
  with open(home / "python3_calls", encoding="utf-8") as f:
    assert "--reinstall-package pause-flax jax[tpu]" in f.read()


@pytest.mark.parametrize("gcloud_exit0", [False, True])
def test_a_failing_worker_fails_the_launch(checkout, fake_pod, gcloud_exit0):
  """Also when gcloud itself exits 0: the worker's failure line is enough."""
  env, tmp = _fake_python3(fake_pod, 7)
  if gcloud_exit0:
    env["FAKE_GCLOUD_EXIT0"] = "1"
  result = _tpu_pod("install", "--name=t", "--zone=us-central2-b", f"--source-dir={checkout}",
                    env=env)
  assert result.returncode == (1 if gcloud_exit0 else 7)
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("tpu_pod.py: error: install step 2 of 2 failed")
  assert f"install failed on worker {socket.gethostname()} with exit status 7" in last
  assert os.listdir(tmp) == []


def test_run_fails_when_training_dies_at_start(checkout, fake_pod):
  home, env = fake_pod
  _write(str(home / "pause_flax_venv" / "bin" / "python"),
         "#!/usr/bin/env bash\necho 'bad gin binding' >&2\nexit 3\n", 0o755)
  result = _tpu_pod(
      "run", "--name=t", "--zone=us-central2-b", f"--source-dir={checkout}",
      f"--gin-file={GIN_FILE}", f"--model-dir={MODEL_DIR}", "--check-seconds=1", env=env,
  )
  assert result.returncode == 3
  assert "bad gin binding" in result.stderr  # The end of the worker's log.
  assert "run failed on worker" in result.stderr.strip().splitlines()[-1]
  assert not os.path.exists(home / "pause_flax_logs" / "train.pid")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator-type=v7-8"], "--accelerator-type 'v7-8': unknown accelerator type"),
        (["--accelerator-type=v4-30"], "multiples of 8"),
        (["--accelerator-type=v5litepod-12"], "v5litepod slices have"),
        (["--model-dir=/local/run"], "not on GCS"),
        (["--model-dir=gs://b/my run"], "spaces or quotes"),
        (["--tfds-data-dir=/data/tfds"], "not on GCS"),
        (["--gin-file=gin_configs/paper/missing.gin"], "not found"),
        (["--gin-file=/abs/file.gin"], "under gin_configs/"),
        (["--gin-file=setup.py"], "under gin_configs/"),
        (["--name=Bad_Name"], "--name"),
        (["--gin=NO_VALUE"], "KEY=VALUE"),
        (["--env=1X=2"], "--env '1X=2' is not NAME=VALUE"),
        (["--env=NO_VALUE"], "--env 'NO_VALUE' is not NAME=VALUE"),
        (["--env=A B=1"], "--env 'A B=1' is not NAME=VALUE"),
        (["--zone=us-central2"], "--zone 'us-central2' is not a zone"),
        (["--check-seconds=-1"], "--check-seconds -1 is negative"),
        (["--check-seconds=soon"], "--check-seconds: invalid int value"),
    ],
)
def test_bad_inputs_fail_clearly(checkout, args, message):
  base = {
      "--name": "t", "--zone": "us-central2-b", "--accelerator-type": "v4-32",
      "--source-dir": checkout, "--gin-file": GIN_FILE, "--model-dir": MODEL_DIR,
  }
  for arg in args:
    base[arg.split("=", 1)[0]] = arg.split("=", 1)[1]
  result = _tpu_pod("up", *[f"{k}={v}" for k, v in base.items()], "--dry-run")
  assert result.returncode == 2
  assert len(result.stderr.splitlines()) == 1, result.stderr
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert result.stdout == ""


def test_debug_shows_the_traceback_of_a_refusal():
  result = _tpu_pod("delete", "--name=t", "--zone=nowhere", "--dry-run", "--debug")
  assert result.returncode != 0
  assert "Traceback" in result.stderr and "LaunchError: --zone 'nowhere'" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--name=t", "--zone=us-central2-b"], "create needs --accelerator-type"),
        (["logs", "--name=t", "--zone=us-central2-b"], "logs needs --accelerator-type"),
        (["run", "--name=t", "--zone=us-central2-b", f"--model-dir={MODEL_DIR}"],
         "at least one --gin-file"),
    ],
)
def test_missing_flags_fail_clearly(args, message):
  result = _tpu_pod(*args, "--dry-run")
  assert result.returncode == 2 and message in result.stderr


def test_install_needs_a_checkout(tmp_path):
  result = _tpu_pod("install", "--name=t", "--zone=us-central2-b", f"--source-dir={tmp_path}",
                    "--dry-run")
  assert result.returncode == 2 and "pause_flax checkout" in result.stderr


@pytest.mark.skipif(
    not os.path.exists(os.path.join(REPO, GIN_FILE)), reason="paper gin file not written yet"
)
def test_up_dry_run_with_this_checkout():
  result = _tpu_pod(
      "up", "--name=pause-130m", "--zone=us-central2-b", "--accelerator-type=v4-32",
      f"--gin-file={GIN_FILE}", f"--model-dir={MODEL_DIR}", "--dry-run",
  )
  assert result.returncode == 0, result.stderr
  assert f"--gin_file={GIN_FILE}" in result.stdout


def _local(*args, launcher=LOCAL):
  command = [launcher] if launcher.endswith(".sh") else [sys.executable, launcher]
  command += args
  return subprocess.run(command, capture_output=True, text=True, check=False)


def test_local_dry_run_prints_one_command_per_process(checkout, tmp_path):
  result = _local(
      "--num-processes=3", "--devices-per-process=2", "--port=4321",
      f"--source-dir={checkout}",
      f"--gin-file={GIN_FILE}", f"--model-dir={tmp_path / 'run'}", "--gin=TRAIN_STEPS=5",
      "--dry-run", "--", "--extra", launcher=LOCAL_SH,
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == shlex.join(["cd", checkout]) and lines[-1] == "wait"
  commands = [shlex.split(line) for line in lines if "pause_flax.train" in line]
  assert len(commands) == 3
  for i, argv in enumerate(commands):
    assert argv[:2] == [
        "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"
    ]
    assert _flag(argv, "process_id") == str(i)
    assert _flag(argv, "num_processes") == "3"
    assert _flag(argv, "coordinator_address") == "127.0.0.1:4321"
    assert f"--gin_file={GIN_FILE}" in argv
    assert f'--gin.MODEL_DIR="{tmp_path / "run"}"' in argv
    assert "--gin.TRAIN_STEPS=5" in argv and "--extra" in argv
    assert argv[-4:] == [">", str(tmp_path / "run" / "logs" / f"process-{i}.log"), "2>&1", "&"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin-file=gin_configs/nope.gin"], "--gin-file 'gin_configs/nope.gin' not found"),
        (["--gin-file=" + GIN_FILE, "--num-processes=0"], "--num-processes"),
        (["--gin-file=" + GIN_FILE, "--num-processes=two"], "--num-processes: invalid int"),
    ],
)
def test_local_refuses_bad_flags_in_one_line(checkout, tmp_path, args, message):
  result = _local(f"--source-dir={checkout}", f"--model-dir={tmp_path}", "--dry-run", *args)
  assert result.returncode == 2
  assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_local_keeps_a_gcs_model_dir(checkout, tmp_path):
  args = [f"--source-dir={checkout}", f"--gin-file={GIN_FILE}", f"--model-dir={MODEL_DIR}"]
  assert "give a local --log-dir" in _local(*args, "--dry-run").stderr
  result = _local(*args, f"--log-dir={tmp_path}", "--dry-run")
  assert result.returncode == 0, result.stderr
  assert f'--gin.MODEL_DIR="{MODEL_DIR}"' in shlex.split(result.stdout.splitlines()[2])


def _fake_python(path, body):
  _write(str(path), "#!/usr/bin/env bash\n" + body, 0o755)
  return str(path)


def test_local_runs_all_processes_with_logs(checkout, tmp_path):
  python = _fake_python(
      tmp_path / "python", 'echo "$JAX_PLATFORMS $XLA_FLAGS $PWD $*"\n'
  )
  result = _local(
      "--num-processes=2", f"--python={python}", f"--source-dir={checkout}",
      f"--gin-file={GIN_FILE}", f"--model-dir={tmp_path / 'run'}",
  )
  assert result.returncode == 0, result.stderr
  for i in range(2):
    with open(tmp_path / "run" / "logs" / f"process-{i}.log", encoding="utf-8") as f:
      log = f.read()
    expected = f"cpu --xla_force_host_platform_device_count=4 {checkout} -m pause_flax.train"
    assert expected in log
    assert f"--process_id={i}" in log


def test_local_stops_the_rest_when_one_fails(checkout, tmp_path):
  python = _fake_python(
      tmp_path / "python",
      'case " $* " in *" --process_id=1 "*) echo boom; exit 3;; esac\nexec sleep 60\n',
  )
  start = time.monotonic()
  result = _local(
      "--num-processes=3", f"--python={python}", f"--source-dir={checkout}",
      f"--gin-file={GIN_FILE}", f"--model-dir={tmp_path / 'run'}",
  )
  assert time.monotonic() - start < 30  # The sleeping processes were stopped.
  assert result.returncode == 1
  assert "process 1 failed with exit status 3" in result.stderr and "boom" in result.stderr
