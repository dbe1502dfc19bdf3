"""The image itself: who it runs as, what it may write, and what its layers hold.

Reads every file of every layer of ``docker save``, so a secret that was
written in one layer and deleted in a later one is still found.
"""

from __future__ import annotations

import io
import re
import tarfile

import pytest
import yaml

from compose_cluster import COMPOSE_FILE, ROOT, build_image, docker_or_skip

IMAGE = "comind:latest"
#: A PEM private key with its body, not just the marker (which cryptography's code holds as a constant).
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=:,\- \r\n]{40,}-----END ")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PRIVATE|CREDENTIAL|_KEY$", re.IGNORECASE)
#: Files above this are wheels' binaries and data, not where keys or tokens are kept.
SCANNED_BYTES = 1 << 20


@pytest.fixture(scope="module")
def image():
    client = docker_or_skip()
    build_image()
    return client, client.images.get(IMAGE)


class _Stream(io.RawIOBase):
    """``docker save``'s chunks as a file, for tarfile's streaming mode."""

    def __init__(self, chunks):
        self._chunks, self._rest = iter(chunks), b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._rest:
            self._rest = next(self._chunks, None)
            if self._rest is None:
                return 0
        n = min(len(buffer), len(self._rest))
        buffer[:n], self._rest = self._rest[:n], self._rest[n:]
        return n


def layer_files(image):
    """(path, small file's bytes or None) for every file of every layer."""
    with tarfile.open(fileobj=io.BufferedReader(_Stream(image.save(chunk_size=1 << 20)), 1 << 20), mode="r|") as outer:
        for blob in outer:
            if not blob.isfile() or blob.size < 1024:  # manifests and configs, not layers
                continue
            try:
                with tarfile.open(fileobj=outer.extractfile(blob), mode="r|*") as layer:
                    for member in layer:
                        small = member.isfile() and member.size <= SCANNED_BYTES
                        yield member.name, layer.extractfile(member).read() if small else None
            except tarfile.ReadError:  # a JSON blob
                continue


def test_the_image_runs_as_a_numeric_non_root_user_and_declares_no_secrets(image):
    client, found = image
    config = found.attrs["Config"]
    assert config["User"] == "10001:10001"
    names = [entry.split("=", 1)[0] for entry in config["Env"]]
    assert not [n for n in names if SECRET_NAME.search(n)], names
    output = client.containers.run(IMAGE, entrypoint=["python", "-c", "import os; print(os.getuid(), os.getgid())"],
                                   remove=True, read_only=True, tmpfs={"/tmp": ""})
    assert output.decode().split() == ["10001", "10001"]


def test_with_a_read_only_root_it_writes_only_where_it_should(image):
    client, _ = image
    probe = ("import pathlib\n"
             "for d in ('/', '/opt/comind', '/etc', '/tmp', '/checkpoints', '/output', '/tls'):\n"
             "    try:\n"
             "        pathlib.Path(d, 'probe').write_text('x'); print(d, 'writable')\n"
             "    except OSError as error:\n"
             "        print(d, type(error).__name__)\n")
    output = client.containers.run(IMAGE, entrypoint=["python", "-c", probe], remove=True, read_only=True,
                                   tmpfs={"/tmp": ""}, volumes={"comind-image-probe": {"bind": "/checkpoints"}})
    client.volumes.get("comind-image-probe").remove()
    results = dict(line.split() for line in output.decode().splitlines())
    assert results == {"/": "OSError", "/opt/comind": "OSError", "/etc": "OSError", "/tmp": "writable",
                       "/checkpoints": "writable", "/output": "OSError", "/tls": "OSError"}
    # Compose and the chart run every container this way.
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert all(services[s]["read_only"] for s in ("certificates", "ps", "worker-0", "worker-1"))


def test_no_layer_holds_a_secret(image):
    _, found = image
    dev_token = (ROOT / "images" / "dev-token").read_text().strip().encode()
    offenders, scanned = [], 0
    for path, data in layer_files(found):
        scanned += 1
        if re.match(r"(run/secrets/|root/\.cache/|tmp/.+)", path) or path.endswith(("dev-token", ".git/config")):
            offenders.append(f"{path}: should never be in a layer")
        elif data is not None and (PRIVATE_KEY.search(data) or dev_token in data):
            offenders.append(f"{path}: holds a private key or the token")
    assert scanned > 10000  # the layers were really read
    assert offenders == []
    # Build arguments and commands are kept in the history: none may carry a secret either.
    history = " ".join(step.get("CreatedBy", "") for step in found.history())
    assert dev_token.decode() not in history and not re.search(r"(TOKEN|PIP_CERT)=(?!/run/secrets/)\S", history)
    print(f"\n{scanned} files in the layers of {IMAGE}: no secret among them")


def test_the_image_holds_no_packaging_tools_and_no_build_only_files(image):
    client, _ = image
    probe = ("import importlib.util, pathlib\n"
             "for name in ('pip', 'setuptools', 'wheel', 'clang', 'tensorflow', 'comind'):\n"
             "    print(name, importlib.util.find_spec(name) is not None)\n"
             "tf = pathlib.Path(importlib.util.find_spec('tensorflow').origin).parent\n"
             "print('headers', (tf / 'include').exists())\n")
    output = client.containers.run(IMAGE, entrypoint=["/opt/comind/bin/python", "-c", probe], remove=True,
                                   read_only=True, tmpfs={"/tmp": ""})
    found = dict(line.split() for line in output.decode().splitlines())
    # What runs is there; pip and its kind, libclang and TensorFlow's C++ headers are not.
    assert found == {"pip": "False", "setuptools": "False", "wheel": "False", "clang": "False",
                     "tensorflow": "True", "comind": "True", "headers": "False"}


def test_every_locked_package_is_pinned_with_the_hash_of_its_wheel():
    lines = [line for line in (ROOT / "images" / "requirements.lock").read_text().splitlines()
             if not line.startswith("#")]
    assert len(lines) > 50
    bad = [line for line in lines if not re.fullmatch(r"[a-z0-9_]+==[^ ]+ --hash=sha256:[0-9a-f]{64}", line)]
    assert bad == []
    assert not [line for line in lines if line.split("==")[0] in ("pip", "setuptools", "wheel", "libclang")]
