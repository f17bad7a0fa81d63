"""`lapa serve`: a policy behind openpi's websocket protocol, with requests of concurrent clients batched.

    lapa serve runs/finetune --port 8000 [--max-batch 8] [--max-wait-ms 5] [--max-queue 64]

    from openpi_client import websocket_client_policy               # on the robot: pip install openpi-client
    client = websocket_client_policy.WebsocketClientPolicy('gpu-host', 8000)
    client.get_server_metadata()                                     # the policy's metadata, sent on connect
    client.infer({'image': frame, 'instruction': 'push the red block to the left'})['actions']  # float32 (7,)

The protocol is openpi's (openpi/serving/websocket_policy_server.py), so robots that already run
`openpi-client` need no new code: on connect the server sends the policy's metadata; then every
binary message is one observation and gets one reply. Messages are msgpack, numpy arrays packed as
maps {'__ndarray__': True, 'data', 'dtype', 'shape'} (scalars: '__npgeneric__'). A reply is the
packed action dict (numpy arrays, the keys of `Policy.infer`), or a text message with the error,
which the client raises as RuntimeError; the connection stays open either way. `GET /healthz`
answers 200 OK.

Each request is checked (`policy.check_observation`) as it arrives, so one bad request never spoils
a batch, then queued. One worker takes up to `max_batch` queued requests, waiting at most
`max_wait_ms` after the first (not at all once every connected client has a request in the batch:
an openpi client sends its next request only after its reply), and runs `policy.infer` once on the
stacked batch in a thread, so the event loop keeps accepting and checking requests meanwhile. A
request that finds `max_queue` requests already waiting is refused at once: a robot is better
served by an immediate error than by an action that arrives too late.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import http
import signal
import socket
import sys
import threading
import time
from typing import Any, Iterator

import msgpack
import numpy as np
from websockets.asyncio import server as ws_server
from websockets.exceptions import ConnectionClosed

_NDARRAY, _NPGENERIC = b'__ndarray__', b'__npgeneric__'
_REFUSED_DTYPES = 'OV'  # object and void arrays cannot be rebuilt from bytes safely
SHUTTING_DOWN = 'server: shutting down'


def _log(message: str) -> None:
  print(f'{time.strftime("%H:%M:%S")} lapa serve: {message}', file=sys.stderr, flush=True)


def _describe(error: Exception) -> str:
  return f'{type(error).__name__}: {error}' if str(error) else type(error).__name__


# ----- msgpack with numpy arrays (openpi_client/msgpack_numpy.py's wire format) -------------------

def _encode_numpy(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    if value.dtype.kind in _REFUSED_DTYPES:
      raise TypeError(f'cannot send a numpy array of dtype {value.dtype}')
    return {_NDARRAY: True, b'data': value.tobytes(), b'dtype': value.dtype.str, b'shape': value.shape}
  if isinstance(value, np.generic):
    return {_NPGENERIC: True, b'data': value.item(), b'dtype': value.dtype.str}
  raise TypeError(f'cannot send a {type(value).__name__}')


def _decode_numpy(mapping: dict) -> Any:
  if _NDARRAY in mapping:
    dtype = np.dtype(mapping[b'dtype'])
    if dtype.kind in _REFUSED_DTYPES:
      raise ValueError(f'arrays of dtype {dtype} are not accepted')
    return np.frombuffer(mapping[b'data'], dtype).reshape(mapping[b'shape'])
  if _NPGENERIC in mapping:
    return np.dtype(mapping[b'dtype']).type(mapping[b'data'])
  return mapping


def pack(value: Any) -> bytes:
  """msgpack bytes of a (nested) dict of numpy arrays, scalars, strings and numbers."""
  return msgpack.packb(value, default=_encode_numpy)


def unpack(message: bytes) -> Any:
  """The value `pack` (or openpi_client's packer) made; arrays are read-only views of `message`."""
  return msgpack.unpackb(message, object_hook=_decode_numpy)


# ----- Requests and batches ------------------------------------------------------------------------

class RequestError(ValueError):
  """A message that is not a msgpack-numpy observation; the reply names what is wrong."""


@dataclasses.dataclass
class _Request:
  observation: dict             # checked: {'image': uint8 (H, W, 3), 'instruction': str}
  reply: asyncio.Future         # -> bytes (the packed action dict) or str (an error)
  image_shape: tuple[int, ...]  # only images of one shape stack into a batch


def _decode_request(message: bytes | str) -> Any:
  if isinstance(message, str):
    raise RequestError('request: expected a binary msgpack message, got a text message')
  try:
    return unpack(message)
  except Exception as error:  # msgpack raises several unrelated types for malformed bytes
    raise RequestError(f'request: not a msgpack-numpy message ({_describe(error)})') from None


def _same_shape_groups(batch: list[_Request]) -> Iterator[list[_Request]]:
  """The requests of `batch` in groups whose images can be stacked, in order of first arrival."""
  groups: dict[tuple, list[_Request]] = {}
  for request in batch:
    groups.setdefault(request.image_shape, []).append(request)
  yield from groups.values()


def _rows(result: dict, size: int) -> list[dict]:
  """Splits `policy.infer`'s batched result {name: (size, ...)} into one dict per request."""
  arrays = {name: np.asarray(value) for name, value in result.items()}
  for name, value in arrays.items():
    if value.shape[:1] != (size,):
      raise ValueError(f'policy.infer returned {name!r} of shape {value.shape} for a batch of {size}')
  return [{name: value[row] for name, value in arrays.items()} for row in range(size)]


def warm_up(policy, max_batch: int) -> float:
  """Compiles `policy.infer` for the batch sizes the server will see (powers of two up to max_batch, and
  max_batch), on blank images of `policy.metadata['image_size']`; returns the seconds it took."""
  start = time.perf_counter()
  size = int(policy.metadata['image_size'])
  sizes = sorted({min(1 << power, max_batch) for power in range(max_batch.bit_length() + 1)})
  for batch in sizes:
    policy.infer({'image': np.zeros((batch, size, size, 3), np.uint8), 'instruction': [''] * batch})
  return time.perf_counter() - start


# ----- The server ---------------------------------------------------------------------------------

class PolicyServer:
  """Serves `policy` (anything with `metadata`, `check_observation(obs)` and batched `infer(obs)`).

  `serve_forever()` blocks (Ctrl-C or SIGTERM stops it); `start()` serves from a background thread
  and returns once listening, with the bound port in `port` (pass port 0 to pick a free one);
  `stop()` ends it. Also a context manager: `with PolicyServer(policy, port=0) as server: ...`.
  """

  def __init__(self, policy, host: str = '0.0.0.0', port: int = 8000, *, max_batch: int = 8,
               max_wait_ms: float = 5.0, max_queue: int = 64):
    for name, value, least in (('max_batch', max_batch, 1), ('max_queue', max_queue, 1),
                               ('max_wait_ms', max_wait_ms, 0)):
      if value < least:
        raise ValueError(f'{name}: {value}; expected at least {least}')
    self.policy = policy
    self.host, self.port = host, port
    self.max_batch, self.max_wait_ms, self.max_queue = max_batch, max_wait_ms, max_queue
    self._metadata = pack(policy.metadata)  # fails here, not at the first client, if it cannot be sent
    self._queue: asyncio.Queue[_Request] | None = None
    self._pending: set[asyncio.Future] = set()   # replies not sent yet, answered on shutdown
    self._connections = 0
    self._loop: asyncio.AbstractEventLoop | None = None
    self._stopping: asyncio.Event | None = None
    self._thread: threading.Thread | None = None
    self._listening = threading.Event()
    self._failure: BaseException | None = None

  @property
  def queued(self) -> int:
    """Requests waiting for the worker (the batch being computed not included)."""
    return self._queue.qsize() if self._queue else 0

  # ------------------------------------------------------------------------------ lifecycle

  def serve_forever(self) -> None:
    asyncio.run(self._serve())

  def start(self) -> 'PolicyServer':
    self._thread = threading.Thread(target=self._serve_in_thread, name='lapa-serve', daemon=True)
    self._thread.start()
    self._listening.wait()
    if self._failure is not None:
      raise self._failure
    return self

  def stop(self) -> None:
    """Refuses what is still queued, closes every connection and waits for the server to end."""
    if self._loop is not None and not self._loop.is_closed():
      self._loop.call_soon_threadsafe(self._stopping.set)
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> 'PolicyServer':
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def _serve_in_thread(self) -> None:
    try:
      self.serve_forever()
    except BaseException as error:  # handed to start(), which re-raises it in the caller's thread
      self._failure = error
      self._listening.set()

  async def _serve(self) -> None:
    self._loop = asyncio.get_running_loop()
    self._stopping = asyncio.Event()
    self._queue = asyncio.Queue(maxsize=self.max_queue)
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        self._loop.add_signal_handler(signum, self._stopping.set)
    # One thread: policies keep state (their random key) and the accelerator runs one batch at a time anyway.
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='lapa-infer')
    try:
      # compression=None, max_size=None: as openpi's server (frames are arrays; robot cameras can be large).
      async with ws_server.serve(self._connection, self.host, self.port, compression=None, max_size=None,
                                 process_request=_health_check) as server:
        self.port = server.sockets[0].getsockname()[1]
        _log(f'serving {self.policy.metadata.get("source", type(self.policy).__name__)} on '
             f'ws://{self.host}:{self.port} (max batch {self.max_batch}, max wait {self.max_wait_ms} ms, '
             f'max queue {self.max_queue})')
        self._listening.set()
        worker = asyncio.create_task(self._work(executor))
        await self._stopping.wait()
        worker.cancel()
        for reply in self._pending:  # the handlers awaiting these must return before the server can close
          if not reply.done():
            reply.set_result(SHUTTING_DOWN)
    finally:
      executor.shutdown(wait=True)
    _log('stopped')

  # ------------------------------------------------------------------------------ connections

  async def _connection(self, connection: ws_server.ServerConnection) -> None:
    peer = _peer(connection)
    _log(f'{peer} connected')
    self._connections += 1
    answered = 0
    try:
      await connection.send(self._metadata)
      async for message in connection:
        reply = asyncio.get_running_loop().create_future()
        self._pending.add(reply)
        try:
          self._submit(message, reply, peer)
          await connection.send(await reply)
        finally:
          self._pending.discard(reply)
        answered += 1
    except ConnectionClosed:
      pass  # the client went away mid-request; its reply has nowhere to go
    finally:
      self._connections -= 1
    _log(f'{peer} disconnected ({answered} answered)')

  def _submit(self, message: bytes | str, reply: asyncio.Future, peer: str) -> None:
    """Checks and queues one request, or sets `reply` to the error text at once."""
    if self._stopping.is_set():  # the worker is gone: nothing queued now would ever be answered
      reply.set_result(SHUTTING_DOWN)
      return
    try:
      observation = self.policy.check_observation(_decode_request(message))
      request = _Request(observation, reply, observation['image'].shape)
    except Exception as error:  # ObservationError, RequestError, or a policy's own check failing
      _log(f'{peer}: error: {error}')
      reply.set_result(str(error))
      return
    try:
      self._queue.put_nowait(request)
    except asyncio.QueueFull:
      _log(f'{peer}: refused, queue full ({self.max_queue})')
      reply.set_result(f'server busy: its queue of {self.max_queue} requests is full (lapa serve --max-queue); '
                       'retry later')

  # ------------------------------------------------------------------------------ batching

  async def _work(self, executor: concurrent.futures.Executor) -> None:
    while True:
      batch = await self._collect()
      for group in _same_shape_groups(batch):
        await self._infer(group, executor)

  async def _collect(self) -> list[_Request]:
    """Up to max_batch requests: the next one, and whatever arrives within max_wait_ms after it."""
    batch = [await self._queue.get()]
    deadline = asyncio.get_running_loop().time() + self.max_wait_ms / 1000
    while len(batch) < self.max_batch:
      if not self._queue.empty():
        batch.append(self._queue.get_nowait())
        continue
      if len(batch) >= self._connections:  # an openpi client waits for its reply: no one else can join
        break
      remaining = deadline - asyncio.get_running_loop().time()
      if remaining <= 0:
        break
      try:
        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
      except asyncio.TimeoutError:  # an alias of TimeoutError from Python 3.11 on
        break
    return batch

  async def _infer(self, group: list[_Request], executor: concurrent.futures.Executor) -> None:
    """One `policy.infer` call on the stacked images (B, H, W, 3) and B instructions of `group`."""
    try:
      observations = {'image': np.stack([request.observation['image'] for request in group]),
                      'instruction': [request.observation['instruction'] for request in group]}
      result = await asyncio.get_running_loop().run_in_executor(executor, self.policy.infer, observations)
      replies = [pack(row) for row in _rows(result, len(group))]
    except Exception as error:  # the policy's failure: this batch fails, the server goes on
      _log(f'inference failed for a batch of {len(group)}: {_describe(error)}')
      replies = [f'inference failed: {_describe(error)}'] * len(group)
    for request, reply in zip(group, replies):
      if not request.reply.done():  # done: answered 'shutting down' meanwhile
        request.reply.set_result(reply)


def _peer(connection: ws_server.ServerConnection) -> str:
  address = connection.remote_address
  return f'{address[0]}:{address[1]}' if isinstance(address, tuple) else str(address)


def _health_check(connection: ws_server.ServerConnection, request) -> Any:
  """GET /healthz -> 200 OK, as openpi's server (load balancers, container probes); else the handshake goes on."""
  if request.path == '/healthz':
    return connection.respond(http.HTTPStatus.OK, 'OK\n')
  return None


# ----- The command --------------------------------------------------------------------------------

def _check_address(host: str, port: int) -> None:
  """Raises OSError now, not after minutes of loading and compiling, if host:port cannot be listened on."""
  with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
    probe.bind((host, port))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog='lapa serve', description='Serve a finetuned (or latent-pretrained) policy over openpi\'s websocket '
      'protocol; robots query it with openpi-client\'s WebsocketClientPolicy(host, port).infer(obs).')
  parser.add_argument('workdir', help='a finetuning (or latent-pretraining) workdir')
  parser.add_argument('--step', type=int, help='checkpoint step (default: the latest)')
  parser.add_argument('--host', default='0.0.0.0', help='address to listen on (default 0.0.0.0: every interface)')
  parser.add_argument('--port', type=int, default=8000, help='default 8000')
  parser.add_argument('--max-batch', type=int, default=8, help='most requests per policy call (default 8)')
  parser.add_argument('--max-wait-ms', type=float, default=5.0,
                      help='how long a request waits for other clients\' to batch with (default 5)')
  parser.add_argument('--max-queue', type=int, default=64,
                      help='requests waiting beyond this many are refused at once (default 64)')
  args = parser.parse_args(argv)
  for name in ('max_batch', 'max_queue'):
    if getattr(args, name) < 1:
      parser.error(f'--{name.replace("_", "-")} must be at least 1')
  if args.max_wait_ms < 0:
    parser.error('--max-wait-ms must not be negative')

  try:
    _check_address(args.host, args.port)
  except OSError as error:  # the port is taken, or the host is not an address of this machine
    return _cannot_listen(args, error)

  from lapa_jax import policy as policy_lib  # JAX and the model: only once the arguments are fine

  try:
    policy = policy_lib.Policy.from_checkpoint(args.workdir, step=args.step)
  except (FileNotFoundError, KeyError, ValueError) as error:
    print(f'lapa serve: error: {error.args[0] if isinstance(error, KeyError) else error}', file=sys.stderr)
    return 2
  _log(f'compiling for batches of up to {args.max_batch} ...')
  _log(f'compiled in {warm_up(policy, args.max_batch):.1f} s')
  server = PolicyServer(policy, args.host, args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                        max_queue=args.max_queue)
  try:
    server.serve_forever()
  except OSError as error:  # another program took the port while we compiled
    return _cannot_listen(args, error)
  return 0


def _cannot_listen(args: argparse.Namespace, error: OSError) -> int:
  print(f'lapa serve: error: cannot listen on {args.host}:{args.port}: {error.strerror or error}', file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
