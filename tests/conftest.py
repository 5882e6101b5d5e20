import pytest
import torch

from llada_rt.testing import write_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Instruct-style tiny checkpoint (chat template), single model.safetensors."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tmp_path_factory):
    """Base-style tiny checkpoint (no chat template), three shards plus model.safetensors.index.json."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny_sharded"), seed=1, shards=3, chat=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
