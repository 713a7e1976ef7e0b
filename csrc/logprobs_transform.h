// The logit transform of the log-prob ops, shared by every device's kernel:
//   z = softcap * tanh(logit_scale * x / softcap) / temperature   (softcap > 0)
//   z = logit_scale * x / temperature                             (softcap <= 0: off)
// and its derivative dz/dx for the backward pass.
#pragma once
#include <c10/macros/Macros.h>
#include <cmath>

namespace rlhf_kernels {

template <typename acc_t>
struct LogitTransform {
  acc_t scale;           // logit_scale
  acc_t softcap;         // <= 0 means no cap
  acc_t inv_temperature;

  C10_HOST_DEVICE inline acc_t operator()(acc_t x) const {
    const acc_t scaled = scale * x;
    if (softcap > acc_t(0)) return softcap * std::tanh(scaled / softcap) * inv_temperature;
    return scaled * inv_temperature;
  }

  // dz/dx at x.
  C10_HOST_DEVICE inline acc_t derivative(acc_t x) const {
    if (softcap > acc_t(0)) {
      const acc_t t = std::tanh(scale * x / softcap);
      return scale * (acc_t(1) - t * t) * inv_temperature;
    }
    return scale * inv_temperature;
  }
};

}  // namespace rlhf_kernels
