"""The engine in a child process (as vLLM's engine core): a serving replica's model steps here.

Why a process: the step loop is a Python thread between torch ops (about 200 per decode step) and
needs the GIL for each. In the replica's own process it shares the GIL with everything Serve does
per streamed chunk (rendering, ASGI messages, Ray's streaming generator), and at concurrency 16 on
2 cores that cost about a third of its speed. The child owns the model, the KV cache and the
`Engine`; the replica keeps only the tokenizer and the HTTP side.

Protocol, over one socket pair (multiprocessing `Connection`: pickled tuples):
    replica -> child   spec (once), ("add", rid, prompt, params), ("abort", rid), ("shutdown",)
    child -> replica   ("ready", info) | ("error", message) once, then per step
                       ("step", outputs, running, waiting, free rows, prefills, decode batch),
                       and ("dead", error, outputs) if a step raised (the child then exits).
The replica reads on its event loop (`add_reader`: no thread, one wake-up per step) and writes from a
small sender thread, so neither side can block the other. If the child dies, every open request
ends with finish_reason "error" and `check_health()` raises; if the replica dies, the child reads
end-of-file and exits.

    python -m mtnlg_ray.serve.engine_process FD     (started by ProcessEngine, not by hand)
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.errors import UserError
from mtnlg_ray.serve.async_engine import EngineClient, apply
from mtnlg_ray.serve.engine import Engine, Output


class ProcessEngine(EngineClient):
    """An `Engine` over `checkpoint`, stepped by a child process; `tokenizer_path` is what it loaded."""

    def __init__(self, checkpoint: str, device: str = "cpu", max_slots: int = 8, max_context: int | None = None,
                 max_waiting: int = 64):
        super().__init__()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)  # the replica's (OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES), and our package
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "mtnlg_ray.serve.engine_process", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(dict(checkpoint=checkpoint, device=device, max_slots=max_slots, max_context=max_context,
                             max_waiting=max_waiting))
        try:
            kind, info = self._conn.recv()  # blocks while the child loads the model
        except EOFError:
            raise UserError(f"{checkpoint}: the engine process exited while loading it (exit code "
                            f"{self._proc.wait()}; its log is the replica's)") from None
        if kind == "error":
            self._proc.wait()
            raise UserError(info)
        self.max_slots, self.max_waiting = info["max_slots"], info["max_waiting"]
        self.max_context, self.vocab_size = info["max_context"], info["vocab_size"]
        self.tokenizer_path, self.device, self.pid = info["tokenizer"], info["device"], self._proc.pid
        self.num_running = self.num_waiting = 0
        self.free_rows = self.max_slots
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="engine-commands", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------ EngineClient transport
    def _start(self) -> None:  # the first submit: outputs come back on this loop
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def _post(self, cmd: tuple) -> None:
        self._outbox.put(cmd)

    def _alive(self) -> bool:
        return self._proc.poll() is None

    def _send_loop(self) -> None:  # sender thread: a full socket buffer never blocks the event loop
        while (cmd := self._outbox.get()) is not None:
            try:
                self._conn.send(cmd)
            except OSError:
                return  # the child is gone; the reader reports it

    def _on_readable(self) -> None:  # event loop: everything the child sent since
        try:
            while self._conn.poll():
                msg = self._conn.recv()
                if msg[0] == "step":
                    _, outs, self.num_running, self.num_waiting, self.free_rows, prefills, decoded = msg
                    self._deliver(outs)
                    if self.on_step is not None and (prefills or decoded):
                        self.on_step(prefills, decoded)
                elif msg[0] == "dead":
                    self.error = msg[1]
                    self._deliver(msg[2])
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            code = self._proc.wait()
            self._fail_open(self.error or f"engine process {self.pid} exited (code {code})")

    def shutdown(self) -> None:
        if self._proc.poll() is None:
            self._outbox.put(("shutdown",))
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._outbox.put(None)


# ---------------------------------------------------------------------------------------- the child
def build_engine(spec: dict):
    """Load the model (any checkpoint kind, checkpoint/source.py) and its Engine; (engine, info for the replica)."""
    device = spec["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    source = open_source(spec["checkpoint"])
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise UserError(f"{spec['checkpoint']}: has no tokenizer; the server needs one to read text")
    engine = Engine(source.model(device), spec["max_slots"], spec["max_context"], spec["max_waiting"],
                    decode=tokenizer.decode)
    info = dict(max_slots=engine.max_slots, max_waiting=engine.max_waiting, max_context=engine.max_context,
                vocab_size=engine.vocab_size, tokenizer=str(tokenizer.path), device=str(device))
    return engine, info


def serve_steps(conn: Connection) -> int:
    """The child's loop: take commands (blocking only when idle), step, send each step's outputs."""
    spec = conn.recv()
    try:
        engine, info = build_engine(spec)
    except Exception as err:  # noqa: BLE001 - the replica reports it as its own start failure
        conn.send(("error", str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"))
        return 1
    conn.send(("ready", info))
    shape = [0, 0]  # (prefills, decode batch) of the last step

    def on_step(prefills: int, decoded: int) -> None:
        shape[:] = prefills, decoded

    engine.on_step = on_step
    while True:
        outs: list[Output] = []
        handled = False
        while conn.poll(0 if engine.has_work or handled else None):  # EOF counts as readable
            cmd = conn.recv()
            if cmd[0] == "shutdown":
                return 0
            refused = apply(engine, cmd)
            outs += [refused] if refused is not None else []
            handled = True
        shape[:] = 0, 0
        if engine.has_work:
            try:
                outs += engine.step()
            except Exception as err:  # noqa: BLE001 - every request must hear about it
                error = f"{type(err).__name__}: {err}"
                conn.send(("dead", error, outs + engine.fail_all(error)))
                return 1
        conn.send(("step", outs, engine.num_running, engine.num_waiting, len(engine.free), *shape))


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    try:
        return serve_steps(conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 0  # the replica is gone: nothing left to serve


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
