"""The one prepared GPU check (issue 12, 31): every figure a short, rare GPU session should bring back, in one run.

    make gpu-check                                                               # on a GPU: under 8 minutes, one H100/H200
    python -m benchmarks.gpu_check --device cpu --tiny --output /tmp/gc          # every section's code path on a CPU
    python -m benchmarks.gpu_check --only profile                                # one section alone

One module per section, each with its own budget; a section that fails (OOM, compile error, timeout) records
its error and the check goes on. They run in the order 1, 2, 5, 7, 3, 4 (the slowest to compile last):

1. ``vit_b16`` (:mod:`.model_step`): the ``ablation-vitb`` preset's step (ViT-B-16 @ 480, batch 32, bf16), the
   trainer's own TrainStep: ms/step, images/s, peak memory and model FLOP utilisation, baseline vs CM-MaskSD.
2. ``vit_l14`` (:mod:`.model_step`): the ``refcoco-vitl`` preset's (ViT-L-14 @ 532) at the largest batch of
   32, 24, 16, 12, 8 that fits: the same figures.
3. ``torchrun`` (:mod:`.torchrun`): a one-process ``torchrun`` run of the training pipeline (nccl, DDP; at world
   size 1 SyncBatchNorm normalises like BatchNorm): 20 steps and one evaluation pass, train and eval images/s.
4. ``compile`` (:mod:`.compile`): what the trainer's ``--compile`` compiles (``--compile-scope step``: the whole
   MaskSD step): first-step (compile) time, graphs and graph breaks, and the steady-state speed-up over eager.
   It runs in a child process (an inductor crash then costs that section only).
5. ``sync_debug`` (:mod:`.sync_debug`): the CM-MaskSD step under ``torch.cuda.set_sync_debug_mode("error")``.
6. ``checkpoint_branches`` (:mod:`.model_step`): sections 1 and 2 also measure CM-MaskSD with it on.
7. ``profile`` (:mod:`.profile`): torch.profiler over the ViT-B-16 step, baseline and CM-MaskSD: GPU time per
   part (embeddings, encoders, pyramid, neck, decoder, projector, masking, losses, backward, optimizer step)
   and the top kernels.

Random init everywhere (nothing is downloaded), building what the presets' weights build (QuickGELU).
``--tiny`` runs every section on the ``demo`` preset's tiny model (batch 4, a few steps, gloo instead of nccl,
dynamo's "eager" backend instead of inductor) so the check is tested on CPUs. Writes
benchmarks/results/gpu_check.{md,json} (gpu_check_tiny with --tiny). :mod:`.check` runs the sections;
:mod:`.plan` says what they run; :mod:`.section` holds what they share.
"""
