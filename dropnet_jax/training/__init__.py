"""How a masked network is trained: one trial's jitted epochs with early stopping inside the state
(`trainer`), many trials as lanes of one program (`lanes`), batching (`batches`), torch.optim's optimisers
and schedules (`optim`), on-device augmentation (`augment`), the CPU gradient path (`cpu_grads`) and
multi-process runs (`distributed`)."""
