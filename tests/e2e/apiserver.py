"""A real kube-apiserver with etcd on 127.0.0.1, built by tests/e2e/build.sh, for e2e tests.

`ApiServer` starts both (free loopback ports, a temporary data directory, a static admin
token, a self-signed serving certificate), waits for /readyz, and stops both after. `call()`
is a tiny JSON client over HTTPS for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiodp.standins.testbed import free_port
from tests.e2e.peer import CACHE

TOKEN = "aiodp-e2e-admin-token"


def _binary(name: str) -> Path:
    found = sorted((CACHE / "bin").glob(f"{name}-v*"))
    if not found:
        raise RuntimeError(f"no {name} under {CACHE / 'bin'}: run tests/e2e/build.sh")
    return found[-1]


async def stop(proc: asyncio.subprocess.Process, within: float = 10) -> None:
    """SIGTERM, then SIGKILL after `within` seconds."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        async with asyncio.timeout(within):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


class ApiServer:
    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.extra = extra
        """More kube-apiserver flags (e.g. --runtime-config for an old kubelet's API)."""
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self._procs: list[asyncio.subprocess.Process] = []
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE  # its own self-signed certificate, on loopback

    def kubeconfig(self, directory: Path) -> Path:
        """A kubeconfig for this server (admin token; its self-signed certificate trusted)."""
        path = directory / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {"server": self.url,
                                                     "insecure-skip-tls-verify": True}}],
            "users": [{"name": "e2e", "user": {"token": TOKEN}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        }))  # fmt: skip
        return path

    async def __aenter__(self) -> ApiServer:
        d = self.directory
        client, peer = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client}"
        self._procs.append(
            await self._spawn(
                "etcd",
                "--name=e2e", f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=e2e=http://127.0.0.1:{peer}",
            )
        )  # fmt: skip
        key = d / "sa.key"
        openssl = await asyncio.create_subprocess_exec(
            "openssl", "genrsa", "-out", str(key), "2048", stderr=subprocess.DEVNULL
        )
        if await openssl.wait() != 0:
            raise RuntimeError("openssl could not make the service-account key")
        tokens = d / "tokens.csv"
        tokens.write_text(f'{TOKEN},admin,admin-uid,"system:masters"\n')
        self._procs.append(
            await self._spawn(
                "kube-apiserver",
                f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1",
                f"--secure-port={self.port}", f"--cert-dir={d / 'certs'}",
                f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={key}", f"--service-account-signing-key-file={key}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--disable-admission-plugins=ServiceAccount", *self.extra,
            )
        )  # fmt: skip
        await self._ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            await stop(proc)

    async def _spawn(self, name: str, *args: str) -> asyncio.subprocess.Process:
        with (self.directory / f"{name}.log").open("wb") as log:  # the child keeps its own fd
            return await asyncio.create_subprocess_exec(
                str(_binary(name)), *args, stdout=log, stderr=subprocess.STDOUT
            )

    async def _ready(self) -> None:
        """Until /readyz answers 200 (etcd up, the apiserver's post-start hooks done)."""
        async with asyncio.timeout(120):
            while True:
                for proc in self._procs:
                    if proc.returncode is not None:
                        raise RuntimeError(self._log_tail(proc))
                try:
                    status, _ = await self.call("GET", "/readyz")
                    if status == 200:
                        return
                except OSError:
                    pass
                await asyncio.sleep(0.2)  # an external process starting: poll its readiness

    def _log_tail(self, proc: asyncio.subprocess.Process) -> str:
        logs = [p.read_text(errors="replace")[-1500:] for p in self.directory.glob("*.log")]
        return f"exited with {proc.returncode}:\n" + "\n".join(logs)

    async def call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        return await asyncio.to_thread(self._call, method, path, body, content_type)

    def _call(self, method: str, path: str, body: Any, content_type: str) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._tls, timeout=10) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")


class Scheduler:
    """The real kube-scheduler (built by tests/e2e/build.sh) against an ApiServer: it places
    pods and allocates their ResourceClaims from the published ResourceSlices."""

    def __init__(self, api: ApiServer, directory: Path) -> None:
        self.api = api
        self.directory = directory
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Scheduler:
        kubeconfig = self.api.kubeconfig(self.directory)
        self._proc = await self.api._spawn(
            "kube-scheduler", f"--kubeconfig={kubeconfig}", "--leader-elect=false",
            "--secure-port=0", "--v=2",
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await stop(proc)
