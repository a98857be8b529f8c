"""Several processes, one run: start JAX's distributed runtime and agree on who writes.

Contract:
- ``initialize`` is called once, before anything touches a JAX device (the CLI does it before any
  setting runs). Options come from the arguments, else from ``JAXRECOVER_COORDINATOR``
  (``HOST:PORT``), ``JAXRECOVER_NUM_PROCESSES``, ``JAXRECOVER_PROCESS_ID``; with none of them it does
  nothing (one process), except on a Cloud TPU VM or with ``auto=True`` / ``JAXRECOVER_DISTRIBUTED=auto``,
  where ``jax.distributed.initialize()`` detects the slice (TPU, SLURM, Open MPI, Kubernetes) itself.
- On CPU the cross-process collectives go through gloo (``jax_cpu_collectives_implementation``).
- Bad input never hangs: a process id outside ``[0, num_processes)`` fails at once. Before JAX's
  runtime starts, a plain-socket roll call on the coordinator's port (``_preflight``) has every process
  report ``version, num_processes, process_id`` to process 0, which answers each one: different
  versions, counts or a repeated id fail at once in every process; a coordinator nobody answers, or
  processes missing, fail after ``timeout_s`` (default 120 s: hosts of a slice start within a minute
  of each other) with a message naming the coordinator and who is missing. (JAX's own client aborts
  the process when it cannot connect, which no ``try`` catches; the roll call makes that case rare.)
- After the runtime is up every process also publishes ``jaxrecover.__version__`` and its process
  count in the coordinator's key-value store and reads everyone else's (``handshake``: this is what
  checks a TPU slice started by auto-detection, where no roll call runs).
- ``is_writer()`` (process 0) is the one process that writes result files and run keys; orbax
  checkpoints are written by all processes together (each writes its shards). The results folder must
  therefore be one folder that every process sees (a shared or network filesystem, or GCS through
  orbax): ``check_shared_dir`` verifies that and refuses otherwise.

Not here: sharding arrays over the global devices (``sharding``), the batch loops (``runner``).
"""

import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

ENV_COORDINATOR = "JAXRECOVER_COORDINATOR"
ENV_NUM_PROCESSES = "JAXRECOVER_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXRECOVER_PROCESS_ID"
ENV_TIMEOUT = "JAXRECOVER_INIT_TIMEOUT"
ENV_AUTO = "JAXRECOVER_DISTRIBUTED"
DEFAULT_TIMEOUT_S = 120

_MSG_PARTIAL = (
    "jaxrecover.runtime.distributed: give all three of coordinator (HOST:PORT), num_processes and process_id "
    "(flags --coordinator --num-processes --process-id or env {c}, {n}, {p}); got {got}."
)
_MSG_ID = "jaxrecover.runtime.distributed: process_id {i} is outside [0, num_processes={n})."
_MSG_CONNECT = (
    "jaxrecover.runtime.distributed: process {i} of {n} could not join the run at coordinator {c} within {t} s "
    "({err}). Either the coordinator is unreachable (is process 0 running, is HOST:PORT right and open?), "
    "or not all {n} processes were started with the same --num-processes and distinct --process-id values."
)
_MSG_UNREACHABLE = (
    "jaxrecover.runtime.distributed: process {i} of {n} could not reach the coordinator {c} within {t} s ({err}). "
    "Is process 0 running, and is HOST:PORT right and open from this host?"
)
_MSG_MISSING = (
    "only some of the {n} processes reached the coordinator {c} within {t} s (missing process ids: "
    "{missing}): start all of them with the same --num-processes and distinct --process-id values"
)
_MSG_HANDSHAKE = (
    "jaxrecover.runtime.distributed: process {j} did not publish its version within {t} s: it runs another "
    "program or an older jaxrecover (no handshake). Start every process from the same installation."
)
_MSG_MISMATCH = (
    "jaxrecover.runtime.distributed: the processes disagree: {table}. Every process must run the same jaxrecover "
    "version with the same --num-processes; refusing to run."
)
_MSG_NOT_SHARED = (
    "jaxrecover.runtime.distributed: {path} is not one shared folder: process(es) {missing} do not see the "
    "file process 0 wrote there. Results and checkpoints of a multi-process run go to a folder every "
    "process sees (NFS, a shared disk, or one host); pass such an --out."
)

_state: dict[str, Any] = {"initialized": False, "timeout_s": DEFAULT_TIMEOUT_S}


def _on_tpu_vm() -> bool:
    """True on a Cloud TPU VM (TPU chips on the PCI bus), checked without starting a JAX backend."""
    try:
        from jax._src import hardware_utils  # noqa: PLC0415 - private, so guarded

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - any failure means "not detectably a TPU VM"
        return False


def options_from_env(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> tuple[str | None, int | None, int | None]:
    """Arguments win; missing ones come from the ``JAXRECOVER_*`` environment variables."""
    def as_int(name: str, v: Any) -> int | None:
        if v is None or v == "":
            return None
        try:
            return int(v)
        except ValueError:
            raise ValueError(f"jaxrecover.runtime.distributed: {name}={v!r} is not an integer.") from None

    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = as_int(ENV_NUM_PROCESSES, num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES))
    process_id = as_int(ENV_PROCESS_ID, process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID))
    return coordinator, num_processes, process_id


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout_s: int | None = None, auto: bool | None = None) -> bool:
    """Start the distributed runtime (see the module docstring); returns True when it runs.

    Args:
        coordinator: ``HOST:PORT`` of process 0 (which also serves it).
        num_processes: how many processes take part.
        process_id: this process's index in ``[0, num_processes)``.
        timeout_s: seconds to wait for all processes to join and to publish their versions (default
            ``JAXRECOVER_INIT_TIMEOUT`` or 120).
        auto: use ``jax.distributed.initialize()``'s own cluster detection (default: on a Cloud TPU
            VM, or when ``JAXRECOVER_DISTRIBUTED=auto``).

    Raises:
        ValueError: options incomplete or contradictory (immediately).
        RuntimeError: the processes did not all join, or disagree on the version (after ``timeout_s``
            at most).

    >>> initialize("10.0.0.1:1234", 2, 0)      # on host 0; host 1 passes process_id=1
    True
    """
    import jax  # noqa: PLC0415

    if _state["initialized"]:
        return True
    coordinator, num_processes, process_id = options_from_env(coordinator, num_processes, process_id)
    if timeout_s is None:  # a garbage value is named, not a bare int() message
        env_timeout = os.environ.get(ENV_TIMEOUT, "").strip()
        if env_timeout and not (env_timeout.isdigit() and int(env_timeout) > 0):
            raise ValueError(f"jaxrecover.runtime.distributed: {ENV_TIMEOUT}={env_timeout!r}: expected whole seconds >= 1.")
        timeout_s = int(env_timeout or DEFAULT_TIMEOUT_S)
    timeout_s = int(timeout_s)
    env_auto = os.environ.get(ENV_AUTO, "").strip().lower()
    if env_auto not in ("", "auto", "off"):
        raise ValueError(f"jaxrecover.runtime.distributed: {ENV_AUTO}={env_auto!r}: expected auto or off (or unset).")
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if auto is None:
        auto = env_auto == "auto" or (env_auto != "off" and not any(v is not None for v in given.values()) and _on_tpu_vm())
    if not auto and all(v is None for v in given.values()):
        return False  # one process, nothing to start
    if not auto and any(v is None for v in given.values()):
        got = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(_MSG_PARTIAL.format(c=ENV_COORDINATOR, n=ENV_NUM_PROCESSES, p=ENV_PROCESS_ID, got=got))
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"jaxrecover.runtime.distributed: num_processes must be >= 1, got {num_processes}.")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(_MSG_ID.format(i=process_id, n=num_processes))
    port = coordinator.rsplit(":", 1)[-1] if coordinator is not None else "1"
    if coordinator is not None and (":" not in coordinator or not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"jaxrecover.runtime.distributed: coordinator {coordinator!r} must be HOST:PORT (port 1..65535).")
    # CPU devices of different processes talk through gloo (the default has no cross-process path);
    # the option touches the CPU client only, so it is harmless on TPU and GPU hosts
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not auto and num_processes > 1:
        _preflight(coordinator, num_processes, process_id, timeout_s)
    kwargs = {} if auto else {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - the runtime raises XlaRuntimeError / ValueError; say what to check
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(_MSG_CONNECT.format(i=process_id, n=num_processes, c=coordinator, t=timeout_s, err=msg)) from e
    _state.update(initialized=True, timeout_s=timeout_s)
    handshake(timeout_s)
    return True


def _version() -> str:
    from jaxrecover import _version  # noqa: PLC0415 - read at call time (tests fake a version)

    return _version.__version__


def _preflight(coordinator: str, n: int, me: int, timeout_s: float) -> None:
    """Roll call on the coordinator's port before JAX's runtime takes it (see the module docstring).
    Process 0 listens, the others connect (retrying until ``timeout_s``) and send
    ``jaxrecover-preflight VERSION N ID``; process 0 answers ``ok`` or ``error MESSAGE`` to each."""
    host, port = coordinator.rsplit(":", 1)
    port, deadline = int(port), time.monotonic() + timeout_s
    mine = (_version(), n)
    if me != 0:
        conn = None
        while conn is None:
            try:
                conn = socket.create_connection((host.strip("[]"), port), timeout=2)
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(_MSG_UNREACHABLE.format(i=me, n=n, c=coordinator, t=timeout_s, err=e)) from None
                time.sleep(0.2)
        with conn:
            conn.settimeout(timeout_s + 30)  # process 0 waits up to its own timeout for the others
            conn.sendall(f"jaxrecover-preflight {mine[0]} {n} {me}\n".encode())
            try:
                answer = conn.makefile().readline().strip()
            except OSError:
                answer = ""
        if answer != "ok":
            raise RuntimeError(answer.removeprefix("error ") or _MSG_UNREACHABLE.format(
                i=me, n=n, c=coordinator, t=timeout_s, err="no answer: not a jaxrecover coordinator?"))
        return
    family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
    try:
        server = socket.create_server(("", port), family=family, dualstack_ipv6=family == socket.AF_INET6)
    except OSError as e:
        raise RuntimeError(f"jaxrecover.runtime.distributed: process 0 cannot listen on port {port} ({e}).") from None
    peers: dict[int, socket.socket] = {}
    problems: list[str] = []
    with server:
        server.settimeout(0.2)
        while len(peers) < n - 1 and not problems and time.monotonic() < deadline:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            try:
                parts = conn.makefile().readline().split()
            except OSError:
                parts = []
            if len(parts) != 4 or parts[0] != "jaxrecover-preflight":
                conn.close()  # not one of ours (a port scan, another program): ignore it
                continue
            version, their_n, pid = parts[1], int(parts[2]), int(parts[3])
            if (version, their_n) != mine:
                problems.append(f"process {pid} runs jaxrecover {version} with --num-processes {their_n}, "
                                f"process 0 runs {mine[0]} with {n}")
            elif pid in peers or not 0 < pid < n:
                problems.append(f"process id {pid} was given twice (or is 0 or >= {n})")
            if pid in peers:
                peers[-len(peers)] = conn  # keep it to send the error, under a free key
            else:
                peers[pid] = conn
        if not problems and len(peers) < n - 1:
            missing = sorted(set(range(1, n)) - set(peers))  # (no problems: every key is a real id)
            problems.append(_MSG_MISSING.format(n=n, c=coordinator, t=timeout_s, missing=missing))
        answer = "ok" if not problems else "error jaxrecover.runtime.distributed: " + "; ".join(problems) + "."
        for conn in peers.values():
            with conn:
                try:
                    conn.sendall((answer + "\n").encode())
                    conn.recv(1)  # wait for the peer to close first (no TIME_WAIT on the coordinator port)
                except OSError:
                    pass
    if problems:
        raise RuntimeError(answer.removeprefix("error "))


def _client() -> Any:
    """The distributed runtime's client (key-value store and barriers), or None for one process."""
    from jax._src import distributed as jd  # noqa: PLC0415 - the only handle on the KV store

    return jd.global_state.client


def handshake(timeout_s: int | None = None) -> dict[int, str]:
    """Every process publishes ``version|num_processes`` and reads every other's; raises on any
    difference (or on a silent peer, after ``timeout_s``). Returns ``{process: payload}``."""
    import jax  # noqa: PLC0415

    timeout_s = _state["timeout_s"] if timeout_s is None else timeout_s
    mine = f"{_version()}|{jax.process_count()}"
    client, me, n = _client(), jax.process_index(), jax.process_count()
    if client is None or n == 1:
        return {0: mine}
    client.key_value_set(f"jaxrecover/handshake/{me}", mine)
    seen = {}
    for j in range(n):
        try:
            seen[j] = client.blocking_key_value_get(f"jaxrecover/handshake/{j}", int(timeout_s * 1000))
        except Exception as e:  # noqa: BLE001 - a deadline error from the KV store
            raise RuntimeError(_MSG_HANDSHAKE.format(j=j, t=timeout_s)) from e
    if len(set(seen.values())) != 1:
        table = "; ".join(f"process {j}: version|processes = {v}" for j, v in seen.items())
        raise RuntimeError(_MSG_MISMATCH.format(table=table))
    return seen


def process_count() -> int:
    import jax  # noqa: PLC0415

    return jax.process_count()


def is_multiprocess() -> bool:
    """True when the run spans more than one process (``jax.devices()`` holds other hosts' devices)."""
    return _state["initialized"] and process_count() > 1


def is_writer() -> bool:
    """True in the process that writes result files: process 0 (always True in a one-process run).

    Never starts a JAX backend by itself: before ``initialize`` there is one process."""
    if not _state["initialized"]:
        return True
    import jax  # noqa: PLC0415

    return jax.process_index() == 0


def barrier(name: str, timeout_s: int | None = None) -> None:
    """Wait until every process reaches ``name`` (no-op in one process); fails after ``timeout_s``."""
    if not is_multiprocess():
        return
    timeout_s = _state["timeout_s"] if timeout_s is None else timeout_s
    client = _client()
    _state["barriers"] = _state.get("barriers", 0) + 1  # barrier ids must be unique per use
    bid = f"jaxrecover/{name}/{_state['barriers']}"
    try:
        client.wait_at_barrier(bid, int(max(timeout_s, 600) * 1000))
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"jaxrecover.runtime.distributed: barrier {name!r}: not every process arrived ({e}).") from e


def broadcast_flag(value: bool, name: str) -> bool:
    """Process 0's ``value`` in every process (so all take the same branch; no-op in one process)."""
    if not is_multiprocess():
        return value
    _state["flags"] = _state.get("flags", 0) + 1  # keys are write-once: one per use
    client, key = _client(), f"jaxrecover/flag/{name}/{_state['flags']}"
    if is_writer():
        client.key_value_set(key, "1" if value else "0")
    return client.blocking_key_value_get(key, int(max(_state["timeout_s"], 600) * 1000)) == "1"


def shared_token(name: str) -> str:
    """``"<pid>-<16 hex>"`` drawn by process 0 and the same in every process (per ``name`` and use)."""
    _state["tokens"] = _state.get("tokens", 0) + 1
    if not is_multiprocess():
        return f"{os.getpid()}-{secrets.token_hex(8)}"
    client, key = _client(), f"jaxrecover/token/{name}/{_state['tokens']}"
    if is_writer():
        client.key_value_set(key, f"{os.getpid()}-{secrets.token_hex(8)}")
    return client.blocking_key_value_get(key, int(max(_state["timeout_s"], 600) * 1000))


def check_shared_dir(path: str | os.PathLike) -> None:
    """Raise unless every process sees the same folder ``path`` (no-op in one process)."""
    if not is_multiprocess():
        return
    import jax  # noqa: PLC0415

    path = Path(path)
    client, me = _client(), jax.process_index()
    _state["shared"] = _state.get("shared", 0) + 1
    key = f"jaxrecover/shared/{_state['shared']}"
    if me == 0:
        token = secrets.token_hex(8)
        path.mkdir(parents=True, exist_ok=True)
        (path / f".jaxrecover-shared-{token}").write_text(token)
        client.key_value_set(key, token)
    token = client.blocking_key_value_get(key, int(_state["timeout_s"] * 1000))
    probe = path / f".jaxrecover-shared-{token}"
    ok = probe.is_file() and probe.read_text() == token
    client.key_value_set(f"{key}/{me}", "1" if ok else "0")
    oks = {j: client.blocking_key_value_get(f"{key}/{j}", int(_state["timeout_s"] * 1000)) for j in range(jax.process_count())}
    barrier("shared-dir-read")
    if me == 0:
        probe.unlink(missing_ok=True)
    missing = [j for j, v in oks.items() if v != "1"]
    if missing:
        raise RuntimeError(_MSG_NOT_SHARED.format(path=path, missing=", ".join(map(str, missing))))
