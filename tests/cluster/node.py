"""A real single-node cluster for `make cluster-e2e`: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler, containerd 2.x and the kubelet, each a process of
ours started and stopped by PID. It runs inside tests/cluster/inside.sh's namespaces: the
node is 10.200.0.1, the kubernetes Service's IP 10.96.0.1 is answered by the API server
itself, pods get 10.88.0.0/24 from a CNI bridge.

`kubectl()` drives it as an operator does (the kubectl built from the same release).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.cluster import images

CACHE = Path(os.environ.get("AIODP_E2E_CACHE", Path.home() / ".cache" / "aiodp-e2e"))
K8S = "v1.37.2"
CONTAINERD = "v2.2.10"
NODE = "aiodp-node"
NODE_IP = "10.200.0.1"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.88.0.0/24"
TOKEN = "aiodp-cluster-admin"
NODE_TOKEN = "aiodp-cluster-node"
SOCKET = "/run/containerd/containerd.sock"
T = TypeVar("T")


def binary(name: str) -> Path:
    path = CACHE / "bin" / f"{name}-{K8S}"
    if name == "etcd":
        path = next(iter(sorted((CACHE / "bin").glob("etcd-v*"))), path)
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run tests/cluster/run.sh (make cluster-e2e)")
    return path


def wait(check: Callable[[], T | None], what: str, timeout: float = 120, every: float = 0.5) -> T:
    """Poll `check` (an outside system settling) until it returns a value other than None or
    False; AssertionError naming `what` when `timeout` passes."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except (subprocess.CalledProcessError, KeyError, IndexError, ValueError) as e:
            value, last = None, e
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last: {last})"
            )
        time.sleep(every)  # an outside system settling: poll its state


class Proc:
    """One process of the cluster, its output in <work>/logs/<name>.log."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str] | None = None):
        self.name, self.argv, self.logs, self.env = name, argv, logs, env
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.logs / f"{self.name}.log"

    def start(self) -> Proc:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, within: float = 15) -> None:
        """`sig`, then SIGKILL after `within` seconds; by PID."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(within)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class Cluster:
    def __init__(self, work: Path, repo: Path) -> None:
        self.work, self.repo = work, repo
        self.logs = work / "logs"
        self.pki = work / "pki"
        self.kubeconfig = work / "admin.kubeconfig"
        self.procs: dict[str, Proc] = {}
        self.phases: list[tuple[str, float]] = []
        self.etcd_port = 2379

    # -- bring-up ----------------------------------------------------------------------

    def start(self) -> None:
        for d in (self.logs, self.pki, self.work / "cni", self.work / "containerd"):
            d.mkdir(parents=True, exist_ok=True)
        self._phase("certificates", self._certs)
        self._phase("etcd and kube-apiserver", self._control_plane)
        self._phase("kube-controller-manager, kube-scheduler", self._controllers)
        self._phase("containerd and images", self._containerd)
        self._phase("kubelet to node Ready", self._kubelet)

    def _phase(self, what: str, step: Callable[[], None]) -> None:
        start = time.monotonic()
        step()
        took = time.monotonic() - start
        self.phases.append((what, took))
        print(f"cluster: {what}: {took:.1f} s", flush=True)  # noqa: T201 - phase log

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.pki)

    def _certs(self) -> None:
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
                      "ca.key", "-out", "ca.crt", "-subj", "/CN=aiodp-e2e-ca")  # fmt: skip
        sans = ",".join([
            f"IP:{SERVICE_IP}", f"IP:{NODE_IP}", "IP:127.0.0.1", "DNS:localhost",
            "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ])  # fmt: skip
        (self.pki / "san.ext").write_text(
            f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
            "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key",
                      "-out", "apiserver.csr", "-subj", "/CN=kube-apiserver")  # fmt: skip
        self._openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                      "-CAcreateserial", "-days", "2", "-out", "apiserver.crt",
                      "-extfile", "san.ext")  # fmt: skip
        self._openssl("genrsa", "-out", "sa.key", "2048")
        self._openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        (self.pki / "tokens.csv").write_text(
            f'{TOKEN},admin,admin,"system:masters"\n'
            f'{NODE_TOKEN},system:node:{NODE},node,"system:nodes,system:masters"\n'
        )
        self._write_kubeconfig(self.kubeconfig, TOKEN)
        self._write_kubeconfig(self.work / "kubelet.kubeconfig", NODE_TOKEN)

    def _write_kubeconfig(self, path: Path, token: str) -> None:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {
                "server": f"https://{NODE_IP}:443",
                "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "e2e", "user": {"token": token}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
        }))  # fmt: skip

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, argv, self.logs, env).start()
        self.procs[name] = proc
        return proc

    def _control_plane(self) -> None:
        etcd = f"http://127.0.0.1:{self.etcd_port}"
        self._spawn("etcd", [
            str(binary("etcd")), "--name=e2e", f"--data-dir={self.work / 'etcd'}",
            f"--listen-client-urls={etcd}", f"--advertise-client-urls={etcd}",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=e2e=http://127.0.0.1:2380",
        ])  # fmt: skip
        self.start_apiserver()

    def start_apiserver(self) -> None:
        pki = self.pki
        self._spawn("kube-apiserver", [
            str(binary("kube-apiserver")), f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=0.0.0.0", "--secure-port=443", f"--advertise-address={NODE_IP}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--allow-privileged=true", "--kubelet-preferred-address-types=InternalIP",
        ])  # fmt: skip
        wait(lambda: self.kubectl("get", "--raw=/readyz", check=False, timeout=5) == "ok",
             "the API server's /readyz", timeout=120)  # fmt: skip

    def _controllers(self) -> None:
        kc = str(self.kubeconfig)
        self._spawn("kube-controller-manager", [
            str(binary("kube-controller-manager")), f"--kubeconfig={kc}",
            "--leader-elect=false", "--secure-port=0", "--controllers=*,-nodeipam",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}", "--use-service-account-credentials=false",
            "--node-monitor-grace-period=20s",
        ])  # fmt: skip
        self._spawn("kube-scheduler", [
            str(binary("kube-scheduler")), f"--kubeconfig={kc}", "--leader-elect=false",
            "--secure-port=0", "--v=2",
        ])  # fmt: skip

    def _containerd(self) -> None:
        debian = CACHE / "debian"
        conf = self.work / "containerd" / "config.toml"
        conf.write_text(f"""version = 3
root = "{self.work / "containerd" / "root"}"
state = "/run/containerd"
[grpc]
  address = "{SOCKET}"
[plugins."io.containerd.cri.v1.runtime"]
  enable_cdi = true
  cdi_spec_dirs = ["/var/run/cdi"]
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{debian / "usr" / "sbin" / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{debian / "usr" / "lib" / "cni"}"]
    conf_dir = "{self.work / "cni"}"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "registry.k8s.io/pause:3.10"
[plugins."io.containerd.nri.v1.nri"]
  disable = true
""")
        (self.work / "cni" / "10-aiodp.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "aiodp",
            "plugins": [{
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                "hairpinMode": True,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                         "routes": [{"dst": "0.0.0.0/0"}]},
            }],
        }))  # fmt: skip
        self.start_containerd()
        images.pause(CACHE, self.work / "pause.tar")
        images.busybox(CACHE, self.work / "busybox.tar")
        for tar in (self.work / "pause.tar", self.work / "busybox.tar",
                    Path(os.environ["AIODP_CLUSTER_IMAGE"])):  # fmt: skip
            self.ctr("images", "import", "--all-platforms", str(tar))

    def _containerd_dir(self) -> Path:
        return CACHE / "bin" / f"containerd-{CONTAINERD}"

    def start_containerd(self) -> None:
        bindir = self._containerd_dir()
        path = f"{bindir}:{CACHE / 'debian' / 'usr' / 'sbin'}:{os.environ['PATH']}"
        self._spawn("containerd", [
            str(bindir / "containerd"), "--config", str(self.work / "containerd" / "config.toml"),
        ], env={"PATH": path})  # fmt: skip
        wait(lambda: self.ctr("version", check=False) is not None, "containerd's socket", 60)

    def ctr(self, *args: str, check: bool = True) -> str | None:
        r = subprocess.run(
            [str(self._containerd_dir() / "ctr"), "--address", SOCKET, "-n", "k8s.io", *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if r.returncode != 0:
            if check:
                raise RuntimeError(f"ctr {' '.join(args)}: {r.stderr[-1000:]}")
            return None
        return r.stdout

    def _kubelet(self) -> None:
        (self.work / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{SOCKET}",
            "imageServiceEndpoint": f"unix://{SOCKET}",
            "address": NODE_IP, "healthzBindAddress": "127.0.0.1", "readOnlyPort": 0,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "resolvConf": "/etc/resolv.conf", "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "2s", "nodeStatusReportFrequency": "10s",
            "serializeImagePulls": False, "registerNode": True,
        }))  # fmt: skip
        self.start_kubelet()
        wait(self._node_ready, "the node to be Ready", timeout=180)

    def start_kubelet(self) -> Proc:
        return self._spawn("kubelet", [
            str(binary("kubelet")), f"--config={self.work / 'kubelet.yaml'}",
            f"--kubeconfig={self.work / 'kubelet.kubeconfig'}", f"--hostname-override={NODE}",
            f"--node-ip={NODE_IP}", "--v=2",
        ])  # fmt: skip

    def _node_ready(self) -> bool:
        node = self.get("node", NODE, check=False)
        if node is None:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True"
                   for c in node["status"].get("conditions", []))  # fmt: skip

    # -- driving it --------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> str:  # fmt: skip
        r = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, ["kubectl", *args], r.stdout,
                                                r.stderr)  # fmt: skip
        return r.stdout if r.returncode == 0 else r.stderr

    def get(self, kind: str, name: str = "", ns: str = "", check: bool = True) -> Any:
        args = ["get", kind, *([name] if name else []), "-o", "json"]
        if ns:
            args += ["-n", ns]
        r = subprocess.run(
            [str(binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if r.returncode != 0:
            if check:
                raise subprocess.CalledProcessError(r.returncode, args, r.stdout, r.stderr)
            return None
        return json.loads(r.stdout)

    def apply(self, objects: list[dict[str, Any]] | str) -> str:
        text = objects if isinstance(objects, str) else json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": objects})  # fmt: skip
        return self.kubectl("apply", "-f", "-", input=text)

    def node(self) -> dict[str, Any]:
        return self.get("node", NODE)  # type: ignore[no-any-return]

    def allocatable(self, resource: str = "nvidia.com/gpu") -> int:
        return int(self.node()["status"].get("allocatable", {}).get(resource, "0"))

    def capacity(self, resource: str = "nvidia.com/gpu") -> int:
        return int(self.node()["status"].get("capacity", {}).get(resource, "0"))

    # -- teardown ----------------------------------------------------------------------

    def stop(self) -> None:
        """Every process of ours by PID, the kubelet first, etcd last."""
        order = ["kubelet", "containerd", "kube-scheduler", "kube-controller-manager",
                 "kube-apiserver", "etcd"]  # fmt: skip
        for name in order:
            if name in self.procs:
                self.procs[name].stop()
