"""Device names resolve in one place; an unavailable device is a clear error."""

import pytest
import torch

from napari_coordgate.devices import resolve_device


def test_auto_and_cpu_resolve_and_a_device_passes_through():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    assert resolve_device("auto").type in ({expected} if expected else {"cpu", "mps"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_an_unavailable_cuda_device_says_what_to_use(name):
    with pytest.raises(RuntimeError, match=f"device '{name}' was requested but no CUDA GPU"):
        resolve_device(name)


def test_an_unknown_device_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_device_index_beyond_the_gpus_is_a_clear_error():
    with pytest.raises(RuntimeError, match="there are only"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_cpu_networks_are_laid_out_channels_last_and_other_devices_keep_nchw():
    import torch

    from napari_coordgate.config import ModelConfig
    from napari_coordgate.devices import on_device, tensor_layout
    from napari_coordgate.nn import build_model

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tensor_layout(4, cpu) is torch.channels_last and tensor_layout(5, cpu) is torch.channels_last_3d
    assert tensor_layout(1, cpu) is tensor_layout(4, cuda) is tensor_layout(5, cuda) is torch.contiguous_format
    model = on_device(build_model(ModelConfig(depth=2, channels=4)), cpu)
    assert model.down[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    # a 3-D network: its 3-D convolutions channels-last-3d, its gates' 4-D MLP weights channels-last
    model3 = on_device(build_model(ModelConfig(depth=2, channels=4, ndim=3)), cpu)
    assert model3.down[0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert model3.down_gates[0].mlp[0].weight.is_contiguous(memory_format=torch.channels_last)
