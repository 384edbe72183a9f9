"""Continual-learning methods, one Lightning module each, all subclasses of ``ContinualMethod``.

base.py holds the loop's contract (before_experience, train_dataset, fit_experience, fitted,
after_experience, expert_origins, method_state) and replay composition; distillation.py the
KD terms shared by LwF and Lifelong-MoE; replay_buffer.py the class-balanced buffer;
lr_schedule.py the per-experience LR schedules; step_stats.py the epoch's losses and NaN guard;
inferred_routing.py the task inference (``ExperienceInference``) that lifelong_moe_specialized
and its dense peer dense_heads share.
"""
