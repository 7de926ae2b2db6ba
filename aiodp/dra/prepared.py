"""Which claims this node has prepared, and their CDI specs on disk: the DRA `Preparer`.

Prepare reads the claim from the API server, checks it against the devices we publish (a
device that turned Unhealthy since allocation is that claim's error), writes one transient
CDI spec per claim and records the claim in a checkpoint file (written atomically), so that
an unprepare after a restart still removes the spec. Both calls are idempotent; an
unprepare of a claim we never prepared succeeds. File work runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from aiodp.config.model import Config
from aiodp.dra import claims, slices
from aiodp.gpus import mps
from aiodp.gpus.devices import Device, DeviceRegistry
from aiodp.kit import commands
from aiodp.kit.errors import cut_text

log = logging.getLogger(__name__)

CHECKPOINT_VERSION: Final = 1
MAX_CHECKPOINT_BYTES: Final = 4 << 20
MAX_PREPARED: Final = 4096
"""Claims prepared at once on this node (a node has a few dozen DRA devices): the checkpoint
and the CDI directory stay bounded."""
HELPER_TIMEOUT: Final = 10.0
"""Seconds one nvidia-smi call may take (it answers in well under one)."""
CALL_BUDGET: Final = 40.0
"""Seconds one prepare call may take in all, under the kubelet's 45 s deadline: claims not
reached by then get an error of their own instead of the whole call timing out."""


class Settings(Protocol):
    """What prepare needs of the live state (reload.Live has it)."""

    @property
    def config(self) -> Config: ...
    @property
    def control_paths(self) -> Sequence[str]: ...
    @property
    def imex_channels(self) -> Sequence[int]: ...


def write_atomically(path: Path, data: str) -> None:
    """Write `data` to `path` through a temporary file and a rename (blocking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _load_checkpoint(path: Path) -> dict[str, dict[str, Any]]:
    """The prepared claims recorded at `path` (blocking); a missing file is none, a bad one
    is logged and treated as none (its specs stay until the kubelet unprepares them)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CHECKPOINT_BYTES + 1)
        if len(raw) > MAX_CHECKPOINT_BYTES:
            raise ValueError(f"larger than {MAX_CHECKPOINT_BYTES} bytes")
        doc = json.loads(raw)
        if doc.get("version") != CHECKPOINT_VERSION or not isinstance(doc.get("claims"), dict):
            raise ValueError("not an aiodp claim checkpoint")
        return {str(k): v for k, v in doc["claims"].items() if isinstance(v, dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.error("claim checkpoint %s unreadable (%s): starting with no prepared claims",
                  path, cut_text(str(e), 200))  # fmt: skip
        return {}


class ClaimPreparer:
    """The DRA Preparer: claims in, per-claim results out, state in the checkpoint."""

    def __init__(
        self,
        live: Callable[[], Settings],
        registry: DeviceRegistry,
        resource: str,
        pool: str,
        read_claim: Callable[[claims.ClaimRef], Awaitable[Mapping[str, Any]]],
        daemons: mps.Supervisor | None = None,
    ) -> None:
        self.live = live
        self.daemons = daemons
        """Runs the MPS daemon of a claim whose config asks MPS (None: MPS is refused)."""
        self.registry = registry
        self.resource = resource
        self.pool = pool
        self.read_claim = read_claim
        self.prepared: dict[str, dict[str, Any]] = {}
        self._lock = asyncio.Lock()

    @property
    def config(self) -> Config:
        return self.live().config

    async def load(self) -> None:
        """Read the checkpoint (at start)."""
        self.prepared = await asyncio.to_thread(_load_checkpoint, self.config.dra_checkpoint)
        for uid, record in self.prepared.items():  # their daemons are checked (and restarted)
            spec = self._daemon(uid, record.get("mps"))
            if spec is not None and self.daemons is not None:
                self.daemons.adopt_claim(uid, spec)
        if self.prepared:
            log.info("%d prepared claim(s) in %s", len(self.prepared), self.config.dra_checkpoint)

    def _save(self, prepared: Mapping[str, Any]) -> None:
        doc = {"version": CHECKPOINT_VERSION, "claims": prepared}
        write_atomically(self.config.dra_checkpoint, json.dumps(doc, sort_keys=True))

    def devices(self) -> dict[str, Device]:
        return {
            slices.device_name(d): d for d in self.registry.inventory().for_resource(self.resource)
        }

    async def prepare(
        self, refs: Sequence[claims.ClaimRef], budget: float = CALL_BUDGET
    ) -> dict[str, claims.Prepared | str]:
        out: dict[str, claims.Prepared | str] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        async with self._lock:  # the kubelet calls one at a time; a second caller waits
            for ref in refs:
                left = deadline - loop.time()
                if left <= 0:
                    out[ref.uid] = f"not prepared: the call's {budget:.0f} s ran out first"
                    continue
                out[ref.uid] = await self._prepare_one(ref, left)
        return out

    async def _prepare_one(self, ref: claims.ClaimRef, within: float) -> claims.Prepared | str:
        """Prepare one claim; the read from the API server gets at most `within` seconds
        (the files are written whatever it took: a half-written claim is worse)."""
        done = self.prepared.get(ref.uid)
        if done is not None:  # idempotent: the same answer again
            return _restore(ref, done)
        if len(self.prepared) >= MAX_PREPARED:
            return f"this node has {len(self.prepared)} claims prepared, the most it keeps"
        try:
            try:
                async with asyncio.timeout(within):
                    claim = await self.read_claim(ref)
            except TimeoutError:
                return f"not prepared: the call's time ran out reading claim {ref}"
            live = self.live()
            result = claims.prepare(
                ref, claim, driver=self.config.dra_driver_name, pool=self.pool,
                devices=self.devices(), inventory=self.registry.inventory(), config=live.config,
                control_paths=live.control_paths, imex_channels=live.imex_channels,
            )  # fmt: skip
        except (claims.ClaimError, LookupError) as e:
            log.warning("claim %s not prepared: %s", ref, e)
            return str(e)
        if result.time_slices:  # before anything is written: a failure leaves nothing
            failed = await self._set_time_slices(result.time_slices)
            if failed:
                await self._set_time_slices(dict.fromkeys(result.time_slices, 0))
                log.warning("claim %s not prepared: %s", ref, failed)
                return failed
        if result.mps is not None:
            failed = await self._start_daemon(ref, result)
            if failed:
                if result.time_slices:
                    await self._set_time_slices(dict.fromkeys(result.time_slices, 0))
                log.warning("claim %s not prepared: %s", ref, failed)
                return failed
        spec_path = self.config.dra_cdi_dir / result.spec_name
        record = {
            "namespace": ref.namespace,
            "name": ref.name,
            "spec": str(spec_path),
            "devices": [
                {
                    "requests": list(d.requests),
                    "pool": d.pool,
                    "device": d.device,
                    "cdi_id": d.cdi_id,
                    "uuid": d.uuid,
                }
                for d in result.devices
            ],
            "time_slices": dict(result.time_slices),
            "mps": None if result.mps is None else {
                "gpus": list(result.mps.gpus), "threads": result.mps.threads,
                "pinned_mib": result.mps.pinned_mib,
            },
        }  # fmt: skip
        try:
            await asyncio.to_thread(write_atomically, spec_path, json.dumps(result.spec, indent=1))
            await asyncio.to_thread(self._save, {**self.prepared, ref.uid: record})
        except OSError as e:
            msg = f"cannot write the claim's CDI spec or checkpoint: {e.strerror or e}"
            log.error("claim %s not prepared: %s", ref, msg)
            return msg
        self.prepared[ref.uid] = record
        log.info("prepared claim %s: %s", ref, ", ".join(d.device for d in result.devices))
        return result

    def _daemon(self, uid: str, asked: Any) -> mps.DaemonSpec | None:
        """The claim's daemon spec from what its record says (None: no MPS, or no root)."""
        root = self.config.mps_root
        if not isinstance(asked, Mapping) or root is None:
            return None
        by_uuid = {d.gpu: d for d in self.registry.inventory().devices}
        gpus = []
        for uuid in asked.get("gpus") or ():
            d = by_uuid.get(uuid)
            index = int(d.index.split(":")[0]) if d is not None else 0
            gpus.append((index, str(uuid), d.memory_mib if d is not None else 0))
        threads, pinned = asked.get("threads"), asked.get("pinned_mib")
        return mps.DaemonSpec(
            f"claim-{uid}", root, tuple(sorted(gpus)), 1,
            threads if isinstance(threads, int) else None,
            pinned if isinstance(pinned, int) else None,
        )  # fmt: skip

    async def _start_daemon(self, ref: claims.ClaimRef, result: claims.Prepared) -> str:
        """The claim's own MPS daemon, started and limited; "" when it answers, else why."""
        assert result.mps is not None
        if self.daemons is None:
            return "sharing.strategy MPS: this plugin runs no MPS daemons (no NVML here)"
        spec = self._daemon(ref.uid, {"gpus": result.mps.gpus, "threads": result.mps.threads,
                                      "pinned_mib": result.mps.pinned_mib})  # fmt: skip
        assert spec is not None
        try:
            await self.daemons.start_claim(ref.uid, spec)
        except mps.MpsError as e:
            return f"the claim's MPS control daemon did not start: {e}"
        return ""

    async def _set_time_slices(self, wanted: Mapping[str, int]) -> str:
        """`nvidia-smi compute-policy -i <uuid> --set-timeslice <n>` per GPU, as NVIDIA's
        driver sets it; "" when done, else why (one line)."""
        for uuid, value in sorted(wanted.items()):
            why = await _run(
                [self.config.nvidia_smi, "compute-policy", "-i", uuid, "--set-timeslice",
                 str(value)]
            )  # fmt: skip
            if why:
                return f"cannot set the time slice of {uuid} to {value}: {why}"
        if wanted:
            log.info("time slice %s", ", ".join(f"{u}={v}" for u, v in sorted(wanted.items())))
        return ""

    async def unprepare(self, refs: Sequence[claims.ClaimRef]) -> dict[str, str]:
        out: dict[str, str] = {}
        async with self._lock:
            for ref in refs:
                out[ref.uid] = await self._unprepare_one(ref)
        return out

    async def _unprepare_one(self, ref: claims.ClaimRef) -> str:
        record = self.prepared.get(ref.uid)
        if record is None:
            return ""  # never prepared here, or already unprepared: done
        rest = {k: v for k, v in self.prepared.items() if k != ref.uid}
        slices_set = record.get("time_slices") or {}
        if slices_set:  # back to Default, as NVIDIA's driver puts them back
            failed = await self._set_time_slices(dict.fromkeys(map(str, slices_set), 0))
            if failed:
                log.error("claim %s not unprepared: %s", ref, failed)
                return failed
        if record.get("mps") and self.daemons is not None:  # its daemon quits, GPUs DEFAULT
            await self.daemons.stop_claim(ref.uid)
        try:
            await asyncio.to_thread(_remove, Path(str(record.get("spec", ""))))
            await asyncio.to_thread(self._save, rest)
        except OSError as e:
            msg = f"cannot remove the claim's CDI spec or update the checkpoint: {e.strerror or e}"
            log.error("claim %s not unprepared: %s", ref, msg)
            return msg
        self.prepared = rest
        log.info("unprepared claim %s", ref)
        return ""


async def _run(argv: Sequence[str]) -> str:
    """Run a helper binary, bounded in time; "" on success, else why in one line."""
    try:
        code, text = await commands.run(argv, within=HELPER_TIMEOUT)
    except OSError as e:
        return f"cannot run {cut_text(argv[0])}: {e.strerror or e}"
    except TimeoutError:
        return f"{cut_text(argv[0])} gave no answer within {HELPER_TIMEOUT:.0f} s"
    if code != 0:
        return f"{cut_text(argv[0])} exit code {code}: {cut_text(text, 160)}"
    return ""


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _restore(ref: claims.ClaimRef, record: Mapping[str, Any]) -> claims.Prepared:
    return claims.Prepared(
        ref,
        tuple(
            claims.PreparedDevice(
                requests=tuple(d.get("requests") or ()),
                pool=str(d.get("pool", "")),
                device=str(d.get("device", "")),
                cdi_id=str(d.get("cdi_id", "")),
                uuid=str(d.get("uuid", "")),
            )
            for d in record.get("devices") or ()
        ),
        {},
    )
