"""The image, made here the way an operator makes it (`make image`), and what it takes to run it on this machine.

No registry serves base images to this machine; Debian's packages do. So the base is made here: `mmdebstrap` of Debian
bookworm (whose Python is 3.11) imported with `podman import`, then `make image BASE_IMAGE=...`. The build reaches
PyPI through this machine's TLS-inspecting proxy, so its CA bundle is mounted into the build's RUN steps, and pip's
local wheel folders (where the CPU build of torch lies: PyPI's Linux torch is the CUDA build) are mounted and named.

Containers run with runc (the cgroups here are hybrid; crun fails) and a containers.conf of the tests' own:
`cgroup_manager = "cgroupfs"` (no systemd) and `default_ulimits = []`. They join a network namespace the test makes
(`Netns`): no address outside it is used, and a client in it reaches the container's port as a remote caller would.
Images are kept between runs (a cache: the next build reuses its layers); containers and namespaces are removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_RECIPE = ["--variant=minbase", "--include=python3,python3-venv,ca-certificates",
               "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
               "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-exclude=/usr/share/info/*", "bookworm"]
# Named by its recipe: a changed recipe makes a new base.
BASE_IMAGE = "localhost/embedding-base:bookworm-" + hashlib.sha256(" ".join(BASE_RECIPE).encode()).hexdigest()[:8]
TEST_IMAGE = "localhost/embedding-service:test"
WORK = Path("/var/tmp/embedding-service-image-tests")
CONTAINERS_CONF = WORK / "containers.conf"
BUILD_LOG = WORK / "build.log"
TOOLS = {"podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap"}


def say(msg: str) -> None:
    """Progress of the long steps, shown even under pytest's capture."""
    sys.__stderr__.write(f"[image] {msg}\n")
    sys.__stderr__.flush()


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, check: bool = True, timeout: float = 120, capture: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], env=env(), capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {r.returncode}\n{(r.stderr or '')[-3000:]}")
    return r


def ensure_tools() -> None:
    """podman, runc and mmdebstrap from Debian's packages (a fresh CI machine has none of them), and the tests' own
    containers.conf."""
    if os.geteuid() != 0:
        raise RuntimeError("the image tests need root (podman's rootful storage, network namespaces)")
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        say(f"installing {' '.join(missing)} from Debian's packages")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, capture_output=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    WORK.mkdir(parents=True, exist_ok=True)
    CONTAINERS_CONF.write_text(
        '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\nevents_logger = "file"\n'
    )


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def ensure_base() -> str:
    """Debian bookworm (minbase) with Python 3.11 and CA certificates, as a local image (made once; ~45 s): what
python:3.11-slim holds, from Debian's packages."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    say(f"making the base image {BASE_IMAGE}: mmdebstrap {' '.join(BASE_RECIPE)}")
    tar = WORK / "base.tar"
    started = time.monotonic()
    subprocess.run(["mmdebstrap", *BASE_RECIPE, "--format=tar", str(tar), "http://deb.debian.org/debian"],
                   check=True, capture_output=True, timeout=900)
    podman("import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["/bin/bash"]', str(tar), BASE_IMAGE, timeout=300)
    tar.unlink()
    say(f"base image made in {time.monotonic() - started:.0f}s")
    return BASE_IMAGE


def pip_sources() -> tuple[list[str], dict[str, str]]:
    """This machine's pip configuration, carried into the build: its local wheel folders (mounted, PIP_FIND_LINKS) and
    its CA bundle (mounted, PIP_CERT)."""
    mounts: list[str] = []
    args: dict[str, str] = {}
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    links = [p for p in (os.environ.get("PIP_FIND_LINKS") or conf.get("find-links", "")).split() if Path(p).is_dir()]
    for p in links:
        mounts += ["-v", f"{p}:{p}:ro"]
    if links:
        args["PIP_FIND_LINKS"] = " ".join(links)
    cert = os.environ.get("PIP_CERT") or conf.get("cert", "")
    if cert and Path(cert).is_file():
        mounts += ["-v", f"{cert}:{cert}:ro"]
        args["PIP_CERT"] = cert
    return mounts, args


def build(name: str = TEST_IMAGE) -> str:
    """`make image` on the local base; its output goes to BUILD_LOG, with a line of progress per build step."""
    ensure_tools()
    base = ensure_base()
    mounts, args = pip_sources()
    # torch's CPU build comes from the local wheels where there are any; download.pytorch.org is not reachable here.
    if "PIP_FIND_LINKS" in args:
        args["TORCH_INDEX_URL"] = ""
    flags = ["--network", "host", *mounts, *[f"--build-arg={k}={v}" for k, v in args.items()]]
    cmd = ["make", "--no-print-directory", "image", f"IMAGE={name}", f"BASE_IMAGE={base}", "BUILD_FLAGS=" + " ".join(flags)]
    say(f"building {name} (make image): log in {BUILD_LOG}")
    started = time.monotonic()
    with open(BUILD_LOG, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith(("STEP ", "[", "built ")) or "COMMIT" in line:
                say(f"  {time.monotonic() - started:5.0f}s {line.rstrip()[:150]}")
        code = proc.wait(timeout=3600)
    if code != 0:
        raise RuntimeError(f"make image failed ({code}):\n{BUILD_LOG.read_text()[-4000:]}")
    say(f"built {name} in {time.monotonic() - started:.0f}s")
    return name


def inspect(name: str) -> dict:
    return json.loads(podman("image", "inspect", name).stdout)[0]


class Netns:
    """A network namespace of the test's own with an address of its own: a container that joins it
    listens there, and a client run in it (`run`) connects to that address as a caller from elsewhere would (the
    container sees a peer that is not loopback)."""

    def __init__(self, name: str, address: str = "10.215.0.2") -> None:
        self.name, self.address = name, address
        self.path = f"/run/netns/{name}"

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
        try:
            self._make()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make(self) -> None:
        for cmd in (["ip", "netns", "add", self.name],
                    ["ip", "-n", self.name, "link", "set", "lo", "up"],
                    # A veth pair with both ends inside (the dummy link type may be missing from the kernel).
                    ["ip", "-n", self.name, "link", "add", "emb0", "type", "veth", "peer", "name", "emb1"],
                    ["ip", "-n", self.name, "addr", "add", f"{self.address}/24", "dev", "emb0"],
                    ["ip", "-n", self.name, "link", "set", "emb0", "up"],
                    ["ip", "-n", self.name, "link", "set", "emb1", "up"]):
            subprocess.run(cmd, check=True, capture_output=True)

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)

    def python(self, *args: str, timeout: float = 120, input: str | None = None) -> subprocess.CompletedProcess:
        """This checkout's Python (the real client libraries) inside the namespace."""
        return subprocess.run(["ip", "netns", "exec", self.name, sys.executable, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, input=input,
                              # The namespace reaches nothing but itself: the hub client may be online there.
                              env={**os.environ, "NO_PROXY": "*", "no_proxy": "*", "HF_HUB_OFFLINE": "0"})

    def check(self, check: str, **kw) -> dict:
        """One of tests/image_checks.py's checks, run in the namespace; its JSON answer."""
        r = self.python("-m", "tests.image_checks", check, json.dumps(kw))
        if r.returncode != 0:
            raise AssertionError(f"{check}: {r.stderr[-3000:]}")
        return json.loads(r.stdout)


class Container:
    """`podman run -d` of the image in a namespace; always removed."""

    def __init__(self, image: str, netns: Netns, *args: str, name: str, env: dict[str, str] | None = None,
                 options: list[str] | None = None) -> None:
        self.image, self.netns, self.args, self.name = image, netns, args, name
        self.env, self.options = env or {}, options or []

    def __enter__(self) -> Container:
        podman("rm", "-f", "-t", "0", self.name, check=False)
        envs = [x for k, v in self.env.items() for x in ("-e", f"{k}={v}")]
        podman("run", "-d", "--name", self.name, "--network", f"ns:{self.netns.path}", *self.options, *envs, self.image, *self.args)
        return self

    def __exit__(self, *exc: object) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)

    def logs(self) -> str:
        r = podman("logs", self.name, check=False)
        return (r.stdout or "") + (r.stderr or "")

    def state(self) -> dict:
        return json.loads(podman("inspect", self.name).stdout)[0]["State"]

    def exec(self, *argv: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *argv, check=False)

    def wait_ready(self, timeout: float = 240) -> float:
        """Seconds until the image's own HEALTHCHECK command passes."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.state().get("Running"):
                raise AssertionError(f"{self.name} exited:\n{self.logs()[-4000:]}")
            if self.exec("python", "-m", "service.healthcheck").returncode == 0:
                return time.monotonic() - started
            time.sleep(1)
        raise AssertionError(f"{self.name} not ready after {timeout}s:\n{self.logs()[-4000:]}")


@contextlib.contextmanager
def mounted(image: str):
    """The image's root filesystem, read-only (`podman image mount`)."""
    path = podman("image", "mount", image).stdout.strip()
    try:
        yield Path(path)
    finally:
        podman("image", "unmount", image, check=False)
