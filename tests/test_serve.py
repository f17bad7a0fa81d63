"""`lapa serve` against the real openpi client: protocol, errors, the queue limit, batching."""

import socket
import threading
import time
import urllib.request

import numpy as np
import pytest

# The real client robots use (requirements-nodeps.txt; launch/test.sh installs it).
from openpi_client import msgpack_numpy, websocket_client_policy
from websockets.sync import client as ws_client

from lapa_jax import serve


class FakeObservationError(ValueError):
  pass


class FakePolicy:
  """Policy's interface with answers a test can predict: actions = mean(image) * (1..7), and the
  instruction's length (so a reply sent to the wrong client shows)."""

  metadata = {'kind': 'action', 'image_size': 16, 'action_dim': 7}

  def __init__(self, gate: threading.Event | None = None, delay: float = 0.0):
    self.gate, self.delay = gate, delay
    self.batch_sizes = []
    self.entered = threading.Event()

  def check_observation(self, obs):
    if not isinstance(obs, dict):
      raise FakeObservationError(f'observation: expected a dict, got {type(obs).__name__}')
    for key in ('image', 'instruction'):
      if key not in obs:
        raise FakeObservationError(f'observation field {key!r}: missing')
    image = obs['image']
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise FakeObservationError(f"observation field 'image': expected uint8 (H, W, 3), got "
                                 f"{getattr(image, 'dtype', type(image).__name__)} {np.shape(image)}")
    if not isinstance(obs['instruction'], str):
      raise FakeObservationError("observation field 'instruction': expected a string")
    return {'image': image, 'instruction': obs['instruction']}

  def infer(self, obs):
    images, instructions = obs['image'], obs['instruction']
    assert images.ndim == 4 and len(instructions) == len(images), 'the server sends stacked batches'
    self.batch_sizes.append(len(images))
    self.entered.set()
    if self.gate is not None:
      assert self.gate.wait(10), 'the test never opened the gate'
    time.sleep(self.delay)
    if 'raise' in instructions:
      raise RuntimeError('the model fell over')
    return {'actions': expected_actions(images),
            'instruction_length': np.array([len(text) for text in instructions], np.int32)}


def expected_actions(images: np.ndarray) -> np.ndarray:
  """(B, 7) float32 from images (B, H, W, 3)."""
  return (images.mean(axis=(1, 2, 3))[:, None] * np.arange(1, 8)).astype(np.float32)


def observation(value: int = 10, size: int = 16, instruction: str = 'push the red block') -> dict:
  return {'image': np.full((size, size, 3), value, np.uint8), 'instruction': instruction}


@pytest.fixture
def start_server():
  servers = []

  def start(policy, **options):
    server = serve.PolicyServer(policy, '127.0.0.1', 0, **options).start()
    servers.append(server)
    return server
  yield start
  for server in servers:
    server.stop()


def client(server) -> 'websocket_client_policy.WebsocketClientPolicy':
  return websocket_client_policy.WebsocketClientPolicy('127.0.0.1', server.port)


def test_metadata_on_connect_and_a_round_trip(start_server):
  server = start_server(FakePolicy())
  policy_client = client(server)
  assert policy_client.get_server_metadata() == FakePolicy.metadata
  result = policy_client.infer(observation(30, instruction='lift'))
  assert set(result) == {'actions', 'instruction_length'}
  assert result['actions'].dtype == np.float32 and result['actions'].shape == (7,)
  np.testing.assert_allclose(result['actions'], 30 * np.arange(1, 8))
  assert result['instruction_length'] == 4


def test_healthz(start_server):
  server = start_server(FakePolicy())
  with urllib.request.urlopen(f'http://127.0.0.1:{server.port}/healthz', timeout=5) as response:
    assert response.status == 200


@pytest.mark.parametrize('bad, field', [
    ({'instruction': 'push'}, "'image': missing"),
    ({'image': np.zeros((16, 16, 3), np.float32), 'instruction': 'push'}, "'image': expected uint8"),
    ({'image': np.zeros((16, 16, 4), np.uint8), 'instruction': 'push'}, '(16, 16, 4)'),
    ({'image': np.zeros((16, 16, 3), np.uint8), 'instruction': 7}, "'instruction'"),
    ([1, 2, 3], 'expected a dict'),
])
def test_a_bad_request_gets_an_error_naming_the_field_and_the_connection_goes_on(start_server, bad, field):
  server = start_server(FakePolicy())
  policy_client = client(server)
  with pytest.raises(RuntimeError, match='Error in inference server') as error:
    policy_client.infer(bad)
  assert field in str(error.value)
  np.testing.assert_allclose(policy_client.infer(observation(2))['actions'], 2 * np.arange(1, 8))


def test_undecodable_messages_get_an_error_and_the_connection_goes_on(start_server):
  server = start_server(FakePolicy())
  with ws_client.connect(f'ws://127.0.0.1:{server.port}', compression=None, max_size=None) as connection:
    assert msgpack_numpy.unpackb(connection.recv()) == FakePolicy.metadata
    for garbage in (b'\xc1 not msgpack', b'\x92\x01', 'a text message',
                    msgpack_numpy.packb({'image': {b'__ndarray__': True, b'data': b'12', b'dtype': '<f4',
                                                   b'shape': (5, 5)}})):
      connection.send(garbage)
      reply = connection.recv(timeout=5)
      assert isinstance(reply, str) and ('request' in reply or 'observation' in reply), reply
    connection.send(msgpack_numpy.packb(observation(4)))
    reply = connection.recv(timeout=5)
    assert isinstance(reply, bytes)
    np.testing.assert_allclose(msgpack_numpy.unpackb(reply)['actions'], 4 * np.arange(1, 8))
  assert client(server).infer(observation(5))['instruction_length'] == len('push the red block')


def test_a_lone_client_does_not_wait_for_a_batch(start_server):
  server = start_server(FakePolicy(), max_wait_ms=5000)
  policy_client = client(server)
  start = time.monotonic()
  policy_client.infer(observation())
  assert time.monotonic() - start < 2


def test_an_exception_in_infer_fails_its_batch_only(start_server):
  server = start_server(FakePolicy())
  policy_client = client(server)
  with pytest.raises(RuntimeError, match='inference failed: RuntimeError: the model fell over'):
    policy_client.infer(observation(instruction='raise'))
  np.testing.assert_allclose(policy_client.infer(observation(6))['actions'], 6 * np.arange(1, 8))


def test_a_full_queue_refuses_at_once_and_the_server_recovers(start_server):
  gate = threading.Event()
  policy = FakePolicy(gate)
  server = start_server(policy, max_batch=1, max_queue=1)
  answers = {}

  def ask(name, value):
    answers[name] = client(server).infer(observation(value))['actions']
  in_flight = threading.Thread(target=ask, args=('in_flight', 1))
  in_flight.start()
  assert policy.entered.wait(5)
  queued = threading.Thread(target=ask, args=('queued', 2))
  queued.start()
  deadline = time.monotonic() + 5
  while server.queued < 1:
    assert time.monotonic() < deadline, 'the second request never reached the queue'
    time.sleep(0.01)
  refused = client(server)
  start = time.monotonic()
  with pytest.raises(RuntimeError, match='server busy: its queue of 1 requests is full'):
    refused.infer(observation(3))
  assert time.monotonic() - start < 2 and not gate.is_set()
  gate.set()
  in_flight.join(5)
  queued.join(5)
  np.testing.assert_allclose(answers['in_flight'], np.arange(1, 8))
  np.testing.assert_allclose(answers['queued'], 2 * np.arange(1, 8))
  np.testing.assert_allclose(refused.infer(observation(3))['actions'], 3 * np.arange(1, 8))


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(start_server):
  policy = FakePolicy(delay=0.02)
  server = start_server(policy, max_batch=8, max_wait_ms=20)
  clients, requests = 8, 5
  barrier = threading.Barrier(clients)
  failures = []

  def run(index):
    policy_client = client(server)
    barrier.wait()
    for request in range(requests):
      value, size = 10 * index + request, 16 if index % 2 else 24  # two image sizes: two batches per round
      instruction = 'x' * (index + 1)
      result = policy_client.infer(observation(value, size, instruction))
      if not (np.allclose(result['actions'], value * np.arange(1, 8)) and
              result['instruction_length'] == len(instruction)):
        failures.append((index, request, result))
  threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(30)
  assert not failures
  assert sum(policy.batch_sizes) == clients * requests
  assert max(policy.batch_sizes) > 1


def test_stop_answers_what_is_still_waiting():
  gate = threading.Event()
  policy = FakePolicy(gate)
  server = serve.PolicyServer(policy, '127.0.0.1', 0, max_batch=1).start()
  errors = []

  def ask():
    try:
      client(server).infer(observation())
    except Exception as error:  # the server's shutdown reply, or the connection closing
      errors.append(error)
  waiting = [threading.Thread(target=ask) for _ in range(2)]
  for thread in waiting:
    thread.start()
  assert policy.entered.wait(5)
  stopper = threading.Thread(target=server.stop)
  stopper.start()
  time.sleep(0.1)
  gate.set()  # the batch in flight finishes; stop() waits for it
  stopper.join(10)
  for thread in waiting:
    thread.join(10)
  assert not stopper.is_alive() and len(errors) == 2


def test_the_command_reports_a_missing_workdir_in_one_line(tmp_path, capsys):
  assert serve.main([str(tmp_path / 'missing')]) == 2
  error = capsys.readouterr().err.strip()
  assert error.startswith('lapa serve: error:') and '\n' not in error


def test_the_command_reports_a_taken_port_before_loading_anything(capsys):
  with socket.socket() as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    assert serve.main(['no-workdir-needed', '--host', '127.0.0.1', '--port', str(port)]) == 2
  error = capsys.readouterr().err.strip()
  assert error == f'lapa serve: error: cannot listen on 127.0.0.1:{port}: Address already in use'


def test_an_untrained_policy_serves_actions(start_server):
  policy_lib = pytest.importorskip('lapa_jax.policy')
  server = start_server(policy_lib.Policy.untrained('tiny'), max_batch=2)
  policy_client = client(server)
  assert policy_client.get_server_metadata()['kind'] == 'action'
  size = policy_client.get_server_metadata()['image_size']
  image = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
  result = policy_client.infer({'image': image, 'instruction': 'push the red block to the left'})
  assert result['actions'].dtype == np.float32 and result['actions'].shape == (7,)
