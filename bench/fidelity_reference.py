"""How accurate is teacher fidelity's reference (Heun, 128 steps)? Compare fixed-grid Heun with
scipy's RK45 (fewstep.solvers.reference, rtol = atol = 1e-6) on the same seeds of builtin:digits.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fidelity_reference.py
"""

from fewstep.eval.sampling import rmse
from fewstep.seeding import seeded_labels, seeded_noise
from fewstep.solvers import sample
from fewstep.teachers import load_teacher

teacher = load_teacher("builtin:digits")
seeds = range(32)
z, y = seeded_noise(seeds, teacher.sample_shape), seeded_labels(seeds, teacher.num_classes)
rk45, nfe = sample(teacher, z, "reference", 18, y)
print(f"RK45: {nfe} NFE")
for steps in (18, 64, 128, 256):
    x, n = sample(teacher, z, "heun", steps, y)
    print(f"heun {steps} steps ({n} NFE): RMSE to RK45 {rmse(x, rk45):.5f}")
