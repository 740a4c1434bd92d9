// A PyTorch C++ extension that computes the CalibRL loss and its gradient with libcalibrl on
// at::Tensors in place (CPU or CUDA; no copies): calibrl::TensorView wraps each at::Tensor as a
// DLTensor. example.py builds it with torch.utils.cpp_extension.load and wraps it in an autograd
// Function that replaces a pure-PyTorch loss.
//
// For CUDA tensors, define CALIBRL_TORCH_CUDA so the call runs on PyTorch's current stream.
#include <torch/extension.h>

#include <calibrl.hpp>

#include <optional>
#include <string>
#include <tuple>

#if defined(CALIBRL_TORCH_CUDA)
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

calibrl_stream stream_for(const at::Tensor& t) {
#if defined(CALIBRL_TORCH_CUDA)
  if (t.is_cuda()) return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
#else
  TORCH_CHECK(!t.is_cuda(), "calibrl_torch was built without CALIBRL_TORCH_CUDA");
#endif
  return nullptr;
}

// Returns (loss: 0-dim float32, grad_logprobs: like logprobs, metrics: [CALIBRL_METRICS_LEN]),
// all on logprobs' device. The expert arguments are None for the grpo preset.
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_and_grad(
    const std::string& config_json, const at::Tensor& logprobs, const at::Tensor& seq_offsets,
    const at::Tensor& old_logprobs, const at::Tensor& advantages, const at::Tensor& weights,
    const at::Tensor& signs, const std::optional<at::Tensor>& expert_logprobs,
    const std::optional<at::Tensor>& expert_offsets,
    const std::optional<at::Tensor>& expert_index) {
  const calibrl::Config cfg = calibrl::Config::from_json(config_json);
  at::Tensor grad = at::empty_like(logprobs, at::MemoryFormat::Contiguous);
  at::Tensor metrics = at::empty({CALIBRL_METRICS_LEN}, logprobs.options().dtype(at::kFloat));

  calibrl::LossArgs args;
  args.logprobs(logprobs, seq_offsets)
      .old_logprobs(old_logprobs)
      .advantages(advantages)
      .weights(weights)
      .signs(signs)
      .grad_logprobs(grad)
      .metrics(metrics);
  if (expert_logprobs && expert_offsets && expert_index) {
    args.expert(*expert_logprobs, *expert_offsets, *expert_index);
  }
  try {
    calibrl::loss_async(cfg, args, stream_for(logprobs));  // metrics stay on the device
  } catch (const calibrl::Error& e) {
    TORCH_CHECK(false, "calibrl: ", e.what());  // surfaces as a Python RuntimeError
  }
  return {metrics[0], grad, metrics};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  calibrl::check_abi();
  m.doc() = "CalibRL loss via libcalibrl on torch tensors";
  m.def("loss_and_grad", &loss_and_grad, "CalibRL loss, dL/dlogprobs and metrics",
        py::arg("config_json"), py::arg("logprobs"), py::arg("seq_offsets"),
        py::arg("old_logprobs"), py::arg("advantages"), py::arg("weights"), py::arg("signs"),
        py::arg("expert_logprobs") = py::none(), py::arg("expert_offsets") = py::none(),
        py::arg("expert_index") = py::none());
  m.attr("METRICS_LEN") = CALIBRL_METRICS_LEN;
}
