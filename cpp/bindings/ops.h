// Every kernel binding, once for both modules: per op, the builder of its
// argument struct from the module's arrays (checked by core.h), then its entry
// in bind_ops: name, docstring, keyword names (the same in lmxent._cpu and
// lmxent._cuda, listed in each module's `ops`, which the tests' CuPy stand-in
// forwards). A new op's binding is a builder and an entry here: each module
// calls any op's kernel through one generic call (cpu::run, cuda::launch). The public
// API in python/lmxent reshapes, validates values and allocates outputs; these
// take 2-D rows and 1-D per-row arrays.
#pragma once
#include "core.h"

namespace lmxent {
namespace bindings {

template <class M>
SoftmaxArgs softmax_args(Arrays<M>& c, typename M::Array x, typename M::Maybe out, typename M::Maybe lse,
                         double scale, bool log) {
  SoftmaxArgs a;
  a.x = c.view(x, "x", false);
  a.out = c.like(out, "out", true, a.x, a.x.dtype, "must have the shape and dtype of x");
  a.lse = c.vec(lse, compute_of(a.x.dtype), a.x.rows, "lse", true);
  a.tr.scale = scale;
  a.log = log;
  return a;
}

template <class M>
CEArgs cross_entropy_args(Arrays<M>& c, typename M::Array logits, typename M::Maybe targets,
                          typename M::Maybe probs, typename M::Maybe class_weight, int64_t ignore_index,
                          double scale, double softcap, double smoothing, double z_loss, typename M::Maybe loss,
                          typename M::Maybe lse, bool lse_given, typename M::Maybe grad, double grad_scale,
                          typename M::Maybe grad_rows, bool vocab_slice, typename M::Maybe grad_coef) {
  CEArgs a;
  a.logits = c.view(logits, "logits", false);
  const DType ct = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows, V = a.logits.cols;
  if (targets.is_none() == probs.is_none()) fail("targets", "give exactly one of class ids or probabilities");
  if (!targets.is_none()) a.targets = c.ids(targets, n, "targets");
  a.probs = c.like(probs, "targets", false, a.logits, ct,
                   "probabilities must match the logits' shape in the compute dtype");
  a.class_weight = c.vec(class_weight, ct, V, "weight", false);
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.tr.softcap = softcap;
  a.smoothing = smoothing;
  a.z_loss = z_loss;
  a.loss = c.vec(loss, ct, n, "loss", true);
  a.lse = c.vec(lse, ct, n, "lse", !lse_given);
  a.lse_given = lse_given;
  if (lse_given && !a.lse) fail("lse", "required");
  a.grad = c.like(grad, "grad", true, a.logits, a.logits.dtype, "must have the shape and dtype of the logits");
  a.grad_scale = grad_scale;
  a.grad_rows = c.vec(grad_rows, ct, n, "grad_output", false);
  a.vocab_slice = vocab_slice;
  a.grad_coef = c.vec(grad_coef, ct, n, "grad_coef", false);
  return a;
}

template <class M>
TokenStatsArgs token_stats_args(Arrays<M>& c, typename M::Array logits, typename M::Maybe targets,
                                int64_t ignore_index, double scale, typename M::Maybe logprob,
                                typename M::Maybe lse, typename M::Maybe entropy, typename M::Maybe top_prob,
                                typename M::Maybe rank) {
  TokenStatsArgs a;
  a.logits = c.view(logits, "logits", false);
  const DType ct = compute_of(a.logits.dtype);
  const int64_t n = a.logits.rows;
  a.targets = c.ids(targets, n, "targets");
  a.ignore_index = ignore_index;
  a.tr.scale = scale;
  a.logprob = c.vec(logprob, ct, n, "logprob", true);
  a.lse = c.vec(lse, ct, n, "lse", true);
  a.entropy = c.vec(entropy, ct, n, "entropy", true);
  a.top_prob = c.vec(top_prob, ct, n, "top_prob", true);
  if (!rank.is_none()) a.rank = (int64_t*)c.int_vec(rank, 'i', 8, n, "rank", true);
  return a;
}

template <class M>
KLArgs kl_divergence_args(Arrays<M>& c, typename M::Array student, typename M::Array teacher,
                          typename M::Maybe row_mask, double scale, int direction, typename M::Maybe loss,
                          typename M::Maybe grad, double grad_scale, typename M::Maybe grad_rows) {
  KLArgs a;
  a.student = c.view(student, "student_logits", false);
  a.teacher = c.like(teacher, "teacher_logits", false, a.student, a.student.dtype,
                     "must have the student's shape and dtype");
  const DType ct = compute_of(a.student.dtype);
  const int64_t n = a.student.rows;
  if (!row_mask.is_none()) a.row_mask = (const uint8_t*)c.int_vec(row_mask, 'u', 1, n, "mask", false);
  if (direction < 0 || direction > 2) fail("direction", "must be 0 (forward), 1 (reverse) or 2 (js)");
  a.dir = (KLDirection)direction;
  a.tr.scale = scale;
  a.loss = c.vec(loss, ct, n, "loss", true);
  a.grad = c.like(grad, "grad", true, a.student, a.student.dtype,
                  "must have the shape and dtype of the student logits");
  a.grad_scale = grad_scale;
  a.grad_rows = c.vec(grad_rows, ct, n, "grad_output", false);
  return a;
}

// The op table of both modules; sets the module's `ops` ({name: parameter names}).
template <class M>
void bind_ops(py::module_& m) {
  py::dict ops;
  def_op(m, ops, "softmax",
         "Softmax (log=True: log-softmax) of scale * x over each row into out, and/or each row's "
         "log-sum-exp into lse; out and lse may be None.",
         &softmax_args<M>, "x", "out", "lse", "scale", "log");
  def_op(m, ops, "cross_entropy",
         "Per-row cross-entropy of logits against class ids (targets) or probabilities (probs, "
         "exactly one given): loss, lse (read instead when lse_given), and/or the gradient into "
         "grad times grad_scale * grad_rows[r]; outputs may be None. vocab_slice: the logits are a "
         "vocabulary slice, class id -1 a counted row whose target is in another slice; grad_coef: "
         "each row's gradient coefficient A given (else computed).",
         &cross_entropy_args<M>, "logits", "targets", "probs", "class_weight", "ignore_index", "scale",
         "softcap", "smoothing", "z_loss", "loss", "lse", "lse_given", "grad", "grad_scale", "grad_rows",
         "vocab_slice", "grad_coef");
  def_op(m, ops, "token_stats",
         "Per-row statistics of the target class: logprob, lse, entropy, top_prob and rank (any may "
         "be None), in one read of the logits.",
         &token_stats_args<M>, "logits", "targets", "ignore_index", "scale", "logprob", "lse", "entropy",
         "top_prob", "rank");
  def_op(m, ops, "kl_divergence",
         "Per-row KL divergence between softmax(scale * student) and softmax(scale * teacher) "
         "(direction 0 forward, 1 reverse, 2 Jensen-Shannon; rows with row_mask 0 skipped) into "
         "loss, and the student gradient into grad times grad_scale * grad_rows[r] (may be None).",
         &kl_divergence_args<M>, "student", "teacher", "row_mask", "scale", "direction", "loss", "grad",
         "grad_scale", "grad_rows");
  m.attr("ops") = ops;
}

}  // namespace bindings
}  // namespace lmxent
