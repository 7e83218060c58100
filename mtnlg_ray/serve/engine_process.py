"""The engine in a child process (as vLLM's engine core): a serving replica's model steps here.

Why a process: the step loop is a Python thread between torch ops (about 200 per decode step) and
needs the GIL for each. In the replica's own process it shares the GIL with everything Serve does
per streamed chunk (rendering, ASGI messages, Ray's streaming generator), and at concurrency 16 on
2 cores that cost about a third of its speed. The child owns the model, the KV cache and the
`Engine`; the replica keeps only the tokenizer and the HTTP side.

The two talk in the typed messages of messages.py over one socket pair (multiprocessing
`Connection`). The replica reads on its event loop (`add_reader`: no thread, one wake-up per step)
and writes from a small sender thread, so neither side can block the other. If the child dies,
every open request ends with finish_reason "error", `check_health()` raises and `on_dead` is
called; if the replica dies, the child reads end-of-file and exits.

    python -m mtnlg_ray.serve.engine_process FD     (started by ProcessEngine, not by hand)
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from mtnlg_ray.checkpoint.lora_adapter import read_adapter
from mtnlg_ray.checkpoint.source import open_source
from mtnlg_ray.config.serve import SpeculativeConfig
from mtnlg_ray.errors import UserError
from mtnlg_ray.malloc import keep_freed_memory
from mtnlg_ray.model.generate import use_decode_layout
from mtnlg_ray.model.multi_lora import LoraBank
from mtnlg_ray.serve.engine import Engine, Output, StepStats
from mtnlg_ray.serve.engine_client import EngineClient, EngineDead
from mtnlg_ray.serve.messages import (Abort, Add, Dead, EngineSpec, LoadFailed, LoadLora, LoraDone, Ready, Shutdown,
                                      StepResult, UnloadLora)
from mtnlg_ray.serve.sampling import SamplingParams
from mtnlg_ray.serve.structured import GrammarCompiler


def exit_reason(code: int) -> str:
    """A child's exit status in words: "killed by SIGKILL" or "exit code 1"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class ProcessEngine(EngineClient):
    """An `Engine` over `checkpoint`, stepped by a child process; `tokenizer_path` is what it loaded."""

    def __init__(self, checkpoint: str, device: str = "cpu", max_slots: int = 8, max_context: int | None = None,
                 max_waiting: int = 64, prefix_cache_blocks: int | None = None,
                 speculative: SpeculativeConfig | None = None, lora_adapters: dict[str, str] | None = None,
                 max_loras: int = 4, quantization: str = "none"):
        super().__init__()
        ours, theirs = socket.socketpair()
        env = dict(os.environ)  # the replica's (OMP_NUM_THREADS, CUDA_VISIBLE_DEVICES), and our package
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "mtnlg_ray.serve.engine_process", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send(EngineSpec(checkpoint, device, max_slots, max_context, max_waiting, prefix_cache_blocks,
                                   speculative, dict(lora_adapters or {}), max_loras, quantization))
        try:
            ready = self._conn.recv()  # blocks while the child loads the model
        except EOFError:
            raise UserError(f"{checkpoint}: the engine process stopped while loading it "
                            f"({exit_reason(self._proc.wait())}; its log is the replica's)") from None
        if isinstance(ready, LoadFailed):
            self._proc.wait()
            raise UserError(ready.message)
        self.max_slots, self.max_waiting = ready.max_slots, ready.max_waiting
        self.max_context, self.vocab_size = ready.max_context, ready.vocab_size
        self.tokenizer_path, self.device, self.pid = ready.tokenizer, ready.device, self._proc.pid
        self.model_config = ready.model
        self.num_running = self.num_waiting = 0
        self.free_rows = self.max_slots
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lora_replies: deque = deque()  # futures of the LoadLora / UnloadLora sent, answered in order
        self._sender = threading.Thread(target=self._send_loop, name="engine-commands", daemon=True)
        self._sender.start()

    # ------------------------------------------------------------------ EngineClient transport
    def _start(self) -> None:  # the first submit: outputs come back on this loop
        self._loop.add_reader(self._conn.fileno(), self._on_readable)

    def _add(self, rid: str, prompt: list[int], params: SamplingParams, lora: str | None = None) -> None:
        self._outbox.put(Add(rid, prompt, params, lora))

    async def load_lora(self, name: str, path: str) -> str | None:
        """Load a LoRA run's adapters as `name` into the engine's bank: None, or why not in one line.
        EngineDead if the engine stops meanwhile."""
        return await self._lora_call(LoadLora(name, path))

    async def unload_lora(self, name: str) -> str | None:
        """Free adapter `name`'s slot (no request may be using it): None, or why not."""
        return await self._lora_call(UnloadLora(name))

    async def _lora_call(self, msg) -> str | None:
        self.check_health()
        self._ensure_started()
        reply = self._loop.create_future()
        self._lora_replies.append(reply)
        self._outbox.put(msg)
        return await reply

    def _fail_open(self, error: str, outs: list[Output] = ()) -> None:
        super()._fail_open(error, outs)
        while self._lora_replies:
            reply = self._lora_replies.popleft()
            if not reply.done():
                reply.set_exception(EngineDead(self.error))

    def _cancel(self, rid: str) -> None:
        self._outbox.put(Abort(rid))

    def _alive(self) -> bool:
        return self._proc.poll() is None

    def _stop_reason(self) -> str:
        return f"the engine process stopped ({exit_reason(self._proc.wait())})"

    def _send_loop(self) -> None:  # sender thread: a full socket buffer never blocks the event loop
        while (msg := self._outbox.get()) is not None:
            try:
                self._conn.send(msg)
            except OSError:
                return  # the child is gone; the reader reports it

    def _on_readable(self) -> None:  # event loop: everything the child sent since
        try:
            while self._conn.poll():
                msg = self._conn.recv()
                if isinstance(msg, StepResult):
                    self.num_running, self.num_waiting, self.free_rows = msg.num_running, msg.num_waiting, msg.free_rows
                    self._deliver(msg.outputs)
                    if self.on_step is not None and (msg.stats.prefills or msg.stats.decode_batch):
                        self.on_step(msg.stats)
                elif isinstance(msg, LoraDone):
                    reply = self._lora_replies.popleft()
                    if not reply.done():  # its caller may have been cancelled
                        reply.set_result(msg.error)
                elif isinstance(msg, Dead):
                    self._fail_open(msg.error, msg.outputs)
        except (EOFError, OSError):
            self._loop.remove_reader(self._conn.fileno())
            self._fail_open(self._stop_reason())

    def shutdown(self) -> None:
        self.error = self.error or "the engine was shut down"  # on purpose: its exit is no failure (no on_dead)
        if self._proc.poll() is None:
            self._outbox.put(Shutdown())
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._outbox.put(None)


# ---------------------------------------------------------------------------------------- the child
def build_engine(spec: EngineSpec) -> tuple[Engine, Ready]:
    """Load the model (any checkpoint kind, checkpoint/source.py) and its Engine."""
    device = spec.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    source = open_source(spec.checkpoint)
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise UserError(f"{spec.checkpoint}: has no tokenizer; the server needs one to read text")
    model = source.model(device)
    use_decode_layout(model, spec.quantization)  # decode plan: fused products, int8 weights if asked (CPU)
    engine = Engine(model, spec.max_slots, spec.max_context, spec.max_waiting, decode=tokenizer.decode,
                    prefix_cache_blocks=spec.prefix_cache_blocks, speculative=spec.speculative,
                    grammars=GrammarCompiler(tokenizer, model.config.vocab_size),  # structured outputs
                    loras=LoraBank(model, spec.max_loras))  # layers are wrapped by the first adapter targeting them
    for name, path in spec.lora_adapters.items():
        if (error := load_lora(engine, name, path)) is not None:
            raise UserError(f"lora_adapters.{name}: {error}")
    return engine, Ready(engine.max_slots, engine.max_waiting, engine.max_context, engine.vocab_size,
                         str(tokenizer.path), str(device), model.config)


def load_lora(engine: Engine, name: str, path: str) -> str | None:
    """Read a LoRA run's adapters into the engine's bank: None, or why not in one line (the engine goes on)."""
    try:
        engine.loras.load(name, read_adapter(path, engine.model.config))
    except (UserError, ValueError) as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - an unreadable adapter must not stop the engine
        return f"{path}: cannot read the adapters ({type(err).__name__}: {err})"
    return None


def unload_lora(engine: Engine, name: str) -> str | None:
    if name not in engine.loras:
        return f"LoRA adapter {name!r} is not loaded"
    if engine.uses_lora(name):
        return f"LoRA adapter {name!r} has requests running"
    engine.loras.unload(name)
    return None


def serve_steps(conn: Connection) -> int:
    """The child's loop: take messages (blocking only when idle), step, send each step's result."""
    spec: EngineSpec = conn.recv()
    try:
        engine, ready = build_engine(spec)
    except Exception as err:  # noqa: BLE001 - the replica reports it as its own start failure
        conn.send(LoadFailed(str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"))
        return 1
    conn.send(ready)
    last = [StepStats()]  # what the last step did

    engine.on_step = lambda stats: last.__setitem__(0, stats)
    while True:
        outs: list[Output] = []
        handled = False
        try:
            while conn.poll(0 if engine.has_work or handled else None):  # EOF counts as readable
                msg = conn.recv()
                if isinstance(msg, Shutdown):
                    return 0
                if isinstance(msg, Add):
                    engine.add(msg.prompt, msg.params, request_id=msg.request_id, lora=msg.lora)
                elif isinstance(msg, Abort):
                    engine.abort(msg.request_id)
                elif isinstance(msg, LoadLora):
                    conn.send(LoraDone(msg.name, load_lora(engine, msg.name, msg.path)))
                elif isinstance(msg, UnloadLora):
                    conn.send(LoraDone(msg.name, unload_lora(engine, msg.name)))
                handled = True
            last[0] = StepStats()
            if engine.has_work:
                outs += engine.step()
        except (EOFError, OSError):
            raise  # the socket: the replica is gone (main), not a step failure
        except Exception as err:  # noqa: BLE001 - every request must hear about it
            error = f"the engine step failed: {type(err).__name__}: {err}"
            conn.send(Dead(error, outs + engine.fail_all(error)))
            return 1
        conn.send(StepResult(outs, engine.num_running, engine.num_waiting, len(engine.free), last[0]))


def main(argv: list[str]) -> int:
    keep_freed_memory()  # this process only: prefill activations reuse the heap (malloc.py)
    conn = Connection(int(argv[0]))
    try:
        return serve_steps(conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return 0  # the replica is gone: nothing left to serve


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
