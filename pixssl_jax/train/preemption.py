"""Stop requests: SIGTERM and SIGINT (Ctrl-C) make a training loop checkpoint and exit 0.

One process: the first SIGTERM or SIGINT asks the loop to save at the next step boundary and
return. After a SIGINT the previous SIGINT handler is back in place, so a second Ctrl-C
interrupts at once (Python's KeyboardInterrupt), without saving.

Several processes (`jax.distributed`): JAX's preemption service owns SIGTERM and Orbax's
`reached_preemption` names a step all processes agree on, a few steps after the signal; every
process stops there. A process that stopped on its own would leave the others waiting in a
collective, so SIGINT is handed to the same service: the handler sends this process a SIGTERM.
Ctrl-C in a terminal (or `srun` forwarding it) reaches every process; SIGINT to one process
stops all of them. A second Ctrl-C interrupts that process at once; the others then fail when
the coordination service notices it is gone.

A process started with SIGINT ignored (a background job of a non-interactive shell) keeps
ignoring it, as Python does; SIGTERM stops it.
"""

import os
import signal
import threading
from collections.abc import Callable

import jax


def _write_stderr(line: str) -> None:
  # os.write, not print: a handler runs between two bytecodes of the main thread, maybe inside
  # a print to the same stream, and a buffered stream refuses such a re-entrant write.
  os.write(2, (line + '\n').encode())


def _preemption_service_on() -> bool:
  return bool(getattr(jax.config, 'jax_enable_preemption_service', True))


class StopRequest:
  """Knows whether the run must checkpoint and stop at this step boundary.

  Installs its signal handlers on construction (main thread only: Python delivers signals
  there) and puts the previous ones back on `close`.

  Args:
    manager: the run's Orbax CheckpointManager (for `reached_preemption` with several
      processes).
    notify: receives one line when a signal arrives; default: stderr.
  """

  def __init__(self, manager, notify: Callable[[str], None] = _write_stderr):
    self._manager = manager
    self._notify = notify
    self._distributed = jax.distributed.is_initialized()
    self._signalled = threading.Event()
    self._received = None  # The name of the first signal this process got.
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return
    if self._distributed:
      # SIGTERM belongs to JAX's preemption service; without the service SIGINT cannot be
      # forwarded to it and keeps its usual meaning.
      signals = (signal.SIGINT,) if _preemption_service_on() else ()
    else:
      signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
        continue
      self._previous[sig] = signal.signal(sig, self._on_signal)

  @property
  def reason(self) -> str:
    """What asked for the stop, for the final line: the signal, or the preemption service."""
    if self._received is not None:
      return self._received
    return 'preemption notice' if self._distributed else 'stop request'

  def _on_signal(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    first = self._received is None
    if first:
      self._received = name
    if signum == signal.SIGINT:
      # The next Ctrl-C goes to the previous handler: whoever presses it twice means now.
      signal.signal(signal.SIGINT, _restorable(self._previous[signal.SIGINT]))
    if self._distributed:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption service (module docstring).
    self._signalled.set()
    if first:
      where = ('the step all processes agree on' if self._distributed
               else 'the next step boundary')
      again = ('; Ctrl-C again interrupts at once, without saving'
               if signum == signal.SIGINT else '')
      self._notify(f'pixssl_jax: {name} received: saving a checkpoint at {where}, then '
                   f'exiting{again}.')

  def __call__(self, step: int) -> bool:
    """Whether to save and stop before running `step`."""
    if self._distributed:
      return self._manager.reached_preemption(step)
    return self._signalled.is_set()

  def close(self):
    """Puts back the handlers this object replaced (those still in place)."""
    if threading.current_thread() is not threading.main_thread():
      return
    for sig, previous in self._previous.items():
      if signal.getsignal(sig) == self._on_signal:
        signal.signal(sig, _restorable(previous))
    self._previous = {}


def _restorable(handler):
  # signal.getsignal gives None for a handler not installed from Python, which signal.signal
  # does not take; the default action is the closest.
  return signal.SIG_DFL if handler is None else handler
