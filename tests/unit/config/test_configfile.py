"""NVIDIA's version v1 config file: parsing, every validation message, precedence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from aiodp.config import configfile
from aiodp.config import resolve as config
from aiodp.config.configfile import SharedResource
from aiodp.config.model import Config
from aiodp.kit.errors import ConfigError

FULL = """
version: v1
flags:
  migStrategy: mixed
  failOnInitError: false
  nvidiaDriverRoot: /run/nvidia/driver
  plugin:
    passDeviceSpecs: true
    deviceListStrategy: [envvar, cdi-annotations]
    deviceIDStrategy: index
    cdiAnnotationPrefix: cdi.example.org/
    sharedDevicesAllocationPolicy: packed
  gfd:
    oneshot: true
resources:
  gpus: [{pattern: "*H100*", name: h100}]
  mig: [{pattern: "1g.*", name: mig-small}]
sharing:
  timeSlicing:
    renameByDefault: true
    failRequestsGreaterThanOne: true
    resources:
      - name: nvidia.com/gpu
        replicas: 4
        devices: [0, "1", GPU-abc]
      - name: mig-1g.10gb
        replicas: 2
        rename: small-shared
        devices: 2
"""


def test_configfile_full_example() -> None:
    f = configfile.parse(FULL)
    assert f.flags["mig_strategy"] == ("flags.migStrategy", "mixed")
    assert f.flags["device_list_strategy"] == (
        "flags.plugin.deviceListStrategy",
        ["envvar", "cdi-annotations"],
    )
    assert f.ignored == ("flags.gfd.oneshot",)
    assert f.gpu_names[0].name == "nvidia.com/h100"
    assert f.mig_names[0].pattern == "1g.*"
    assert f.sharing is not None
    assert f.sharing.method == "time-slicing"
    assert f.sharing.rename_by_default
    assert f.sharing.fail_requests_greater_than_one
    assert f.sharing.resources == (
        SharedResource("nvidia.com/gpu", 4, "", ("0", "1", "GPU-abc")),
        SharedResource("nvidia.com/mig-1g.10gb", 2, "nvidia.com/small-shared", 2),
    )


def test_configfile_json_and_mps_defaults() -> None:
    f = configfile.parse(
        '{"version": "v1", "sharing": {"mps": {"resources": [{"name": "gpu", "replicas": 3}]}}}'
    )
    assert f.sharing is not None
    assert f.sharing.method == "mps"
    assert f.sharing.fail_requests_greater_than_one  # forced for MPS, as NVIDIA does
    assert f.sharing.resources[0].devices == "all"


def test_configfile_empty_is_v1_defaults() -> None:
    f = configfile.parse("")
    assert f.flags == {}
    assert f.sharing is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: v2", "version: must be v1, got 'v2'"),
        ("flags: 3", "flags: must be a mapping, got 3"),
        ("- a", "(top level): must be a mapping"),
        ("version: [", "invalid YAML or JSON"),
        (
            "sharing: {timeSlicing: {resources: []}}",
            "sharing.timeSlicing.resources: must be a non-empty list",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 1}]}}",
            "sharing.timeSlicing.resources[0].replicas: must be >= 2, got 1",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: two}]}}",
            "sharing.timeSlicing.resources[0].replicas: must be an integer >= 2, got 'two'",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: Bad_Name, replicas: 2}]}}",
            "sharing.timeSlicing.resources[0].name: must be nvidia.com/<name>",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: example.com/gpu, replicas: 2}]}}",
            "sharing.timeSlicing.resources[0].name: must be nvidia.com/<name>",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, devices: 0}]}}",
            "sharing.timeSlicing.resources[0].devices: must be >= 1, got 0",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, devices: [0, 0]}]}}",
            "sharing.timeSlicing.resources[0].devices: lists a device twice",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, devices: some}]}}",
            "sharing.timeSlicing.resources[0].devices: must be all, a count",
        ),
        (
            "sharing: {timeSlicing: {renameByDefault: yes please,"
            " resources: [{name: gpu, replicas: 2}]}}",
            "sharing.timeSlicing.renameByDefault: must be true or false",
        ),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2}]},"
            " mps: {resources: [{name: gpu, replicas: 2}]}}",
            "sharing: timeSlicing and mps are mutually exclusive",
        ),
        ("resources: {gpus: [{name: x}]}", "resources.gpus[0].pattern: must be a glob pattern"),
        ("imex: {channelIDs: [1]}", "imex.channelIDs: must be [] or [0], got [1]"),
    ],
)
def test_configfile_errors_name_the_key_and_value(text: str, message: str) -> None:
    with pytest.raises(configfile.ConfigFileError) as err:
        configfile.parse(text)
    assert message in str(err.value)


def files(**texts: str) -> Callable[[Path], str]:
    def read(path: Path) -> str:
        return texts[path.name]

    return read


def test_configfile_precedence_flag_env_file_default() -> None:
    read = files(**{"c.yaml": FULL})
    c = config.resolve(["--config-file", "/x/c.yaml"], {}, read=read)
    assert c.mig_strategy == "mixed"
    assert c.device_id_strategy == "index"
    assert c.fail_on_init_error is False
    assert c.pass_device_specs is True
    assert c.device_list_strategy == ("envvar", "cdi-annotations")
    assert c.shared_devices_allocation_policy == "packed"
    assert c.health_interval == 5.0  # not in the file: the default
    env = {"CONFIG_FILE": "/x/c.yaml", "DEVICE_ID_STRATEGY": "uuid", "MIG_STRATEGY": "single"}
    c = config.resolve(["--mig-strategy", "none"], env, read=read)
    assert c.device_id_strategy == "uuid"  # env over file
    assert c.mig_strategy == "none"  # flag over env over file
    assert c.config_file == Path("/x/c.yaml")


def test_configfile_reload_keeps_flags_and_env() -> None:
    read = files(**{"c.yaml": FULL})
    c = config.resolve(
        ["--config-file", "/x/c.yaml", "--device-id-strategy", "uuid"], {}, read=read
    )
    again = reloaded(
        c, "version: v1\nflags: {plugin: {deviceIDStrategy: index}, migStrategy: single}\n"
    )
    assert again.device_id_strategy == "uuid"  # the flag still wins
    assert again.mig_strategy == "single"
    assert again.sharing is None
    assert reloaded(c, FULL) == c


def reloaded(running: Config, text: str) -> Config:
    """What a reload builds (reload.Reloader.read_config): the running overrides + the file."""
    file = config.load(Path("/x/c.yaml"), read=files(**{"c.yaml": text}))
    return config.build(running.overrides, file, command=running.command)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("flags: {migStrategy: half}", "flags.migStrategy: invalid value 'half'"),
        (
            "flags: {plugin: {deviceListStrategy: [envvar, files]}}",
            "flags.plugin.deviceListStrategy: invalid value ['envvar', 'files']",
        ),
        ("flags: {failOnInitError: maybe}", "flags.failOnInitError: invalid value 'maybe'"),
        (
            "sharing: {mps: {resources: [{name: gpu, replicas: 2}]}}",
            "sharing.mps: needs flags.mpsRoot",
        ),
        (
            "flags: {migStrategy: mixed, mpsRoot: /run/mps}\n"
            "sharing: {mps: {resources: [{name: gpu, replicas: 2}]}}",
            "sharing.mps: cannot be combined with migStrategy mixed",
        ),
    ],
)
def test_configfile_values_are_validated_like_flags(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.resolve(["--config-file", "/x/c.yaml"], {}, read=files(**{"c.yaml": text}))
    assert message in str(err.value)
    assert (
        str(err.value).startswith("/x/c.yaml")
        or "flags." in str(err.value)
        or "sharing" in str(err.value)
    )


def test_configfile_missing_file_names_it() -> None:
    def missing(path: Path) -> str:
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(ConfigError, match=r"/x/c\.yaml: cannot read the config file"):
        config.resolve([], {"CONFIG_FILE": "/x/c.yaml"}, read=missing)


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)  # 9 * 8**8 = 150 million items once expanded, from about 600 bytes


def test_configfile_aliases_are_refused() -> None:
    """Nested aliases (a YAML bomb) expanded to 2 GB; they are refused before expanding."""
    with pytest.raises(configfile.ConfigFileError, match=r"aliases \(\*name\) are not accepted"):
        configfile.parse("version: v1\n" + LAUGHS)
    with pytest.raises(configfile.ConfigFileError, match="aliases"):
        configfile.parse(LAUGHS)


def test_configfile_size_is_bounded(short_dir: Path) -> None:
    big = short_dir / "big.yaml"
    big.write_text("version: v1\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(
        ConfigError, match=r"big.yaml: 2097165 bytes, more than the limit of 1048576"
    ):
        config.load(big)
    assert config.load(big, limit=4 << 20).flags == {}
    with pytest.raises(ConfigError, match="--max-file-bytes: invalid value '12'"):
        config.resolve(["--max-file-bytes", "12"], {})


def test_configfile_errors_quote_values_cut_short() -> None:
    with pytest.raises(ConfigError) as bad:
        config.build(
            {}, configfile.parse("version: v1\nflags: {migStrategy: " + "y" * 100_000 + "}\n")
        )
    assert str(bad.value).startswith("flags.migStrategy: invalid value 'yyy")
    assert len(str(bad.value)) < 300
    unknown = configfile.parse("version: v1\n" + "k" * 1000 + ": 1\n").unknown
    assert len(unknown) == 1
    assert len(unknown[0]) < 100


def test_configfile_gdrcopy_enabled_applies() -> None:
    """The README said gdrcopyEnabled was of no use to aiodp in one place: it applies."""
    read = {"/c.yaml": "version: v1\nflags: {gdrcopyEnabled: true}\n"}
    c = config.resolve(["--config-file", "/c.yaml"], {}, read=lambda p: read[str(p)])
    assert c.gdrcopy_enabled is True
    assert "gdrcopyEnabled" not in " ".join(c.ignored)
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert "no use for, such as `gdrcopyEnabled`" not in readme


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("colour: red", "colour"),
        ("flags: {nope: 1}", "flags.nope"),
        ("flags: {plugin: {nope: 1}}", "flags.plugin.nope"),
        (
            "sharing: {timeSlicing: {resources: [{name: gpu, replicas: 2, extra: 1}]}}",
            "sharing.timeSlicing.resources[0].extra",
        ),
        ("resources: {cpus: []}", "resources.cpus"),
        ("resources: {gpus: [{pattern: '*', name: a, colour: red}]}", "resources.gpus[0].colour"),
        ("imex: {required: true, later: 1}", "imex.later"),
        ("dra: {gpus: all}", "dra.gpus"),
    ],
)
def test_configfile_an_unknown_key_is_ignored_and_named(text: str, path: str) -> None:
    """NVIDIA's plugin ignores keys outside its schema: so do we, naming each (it exited 2)."""
    assert configfile.parse(f"version: v1\n{text}\n").unknown == (path,)


def test_configfile_unknown_keys_are_bounded() -> None:
    text = "version: v1\nflags:\n" + "".join(f"  k{i}: 1\n" for i in range(1000))
    unknown = configfile.parse(text).unknown
    assert len(unknown) == configfile.MAX_UNKNOWN
    assert unknown[-1] == f"and {1000 - configfile.MAX_UNKNOWN + 1} more"


def test_configfile_a_known_key_with_a_bad_value_is_still_an_error() -> None:
    with pytest.raises(ConfigError, match=r"flags.migStrategy: invalid value 'sideways'"):
        config.resolve(
            ["--config-file", "/c.yaml"],
            {},
            read=lambda _: "version: v1\nflags: {migStrategy: sideways, colour: red}\n",
        )


# The shapes of the example files in NVIDIA's v0.20 README (full flags, time-slicing and MPS,
# each with and without renameByDefault, a MIG mixed config), written here from its schema,
# each with a key NVIDIA's schema does not have.
NVIDIA_EXAMPLES = {
    "flags": "version: v1\nflags:\n  migStrategy: none\n  failOnInitError: true\n"
    "  nvidiaDriverRoot: /\n  plugin:\n    passDeviceSpecs: false\n"
    "    deviceListStrategy: envvar\n    deviceIDStrategy: uuid\n",
    "time-slicing": "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
    "    - name: nvidia.com/gpu\n      replicas: 10\n",
    "time-slicing-renamed": "version: v1\nsharing:\n  timeSlicing:\n    renameByDefault: true\n"
    "    resources:\n    - name: nvidia.com/gpu\n      replicas: 10\n",
    "mps": "version: v1\nsharing:\n  mps:\n    resources:\n    - name: nvidia.com/gpu\n"
    "      replicas: 10\n",
    "mps-renamed": "version: v1\nsharing:\n  mps:\n    renameByDefault: true\n    resources:\n"
    "    - name: nvidia.com/gpu\n      replicas: 10\n",
    "mig-mixed": "version: v1\nflags:\n  migStrategy: mixed\n  failOnInitError: true\n"
    "  nvidiaDriverRoot: /\n",
}


@pytest.mark.parametrize("name", sorted(NVIDIA_EXAMPLES))
def test_configfile_nvidias_examples_with_an_unknown_key_load(name: str) -> None:
    text = NVIDIA_EXAMPLES[name] + "someFutureKey: {enabled: true}\n"
    c = config.resolve(
        ["--config-file", "/c.yaml"], {"MPS_ROOT": "/run/nvidia/mps"}, read=lambda _: text
    )
    assert c.unknown == ("someFutureKey",)
    plain = config.resolve(
        ["--config-file", "/c.yaml"],
        {"MPS_ROOT": "/run/nvidia/mps"},
        read=lambda _: NVIDIA_EXAMPLES[name],
    )
    assert c == plain  # everything else applies as without the key
    assert c.sharing == plain.sharing
