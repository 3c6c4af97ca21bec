"""Where recovery starts: the initialisation registry (`recover.init`).

noise     Gaussian noise (SRe2L / SC-DD, the papers' setting); nothing is stored, each unit draws its own.
real      a seeded random training image of the class per synthetic image (EDC, arXiv 2404.13733).
selected  scored real crops (RDED, arXiv 2312.03526): per class, candidates x crops random-resized crops,
          scored by the recovery teacher's -log p(y | crop); the best crop of each image is kept, then IPC
          images per class by rank (easy: lowest loss; medium: around the median, as FADRM prefers).
herding   the classic coreset (Welling 2009, as in iCaRL): greedily the images whose teacher-feature mean
          tracks the class mean of the candidates.

A real-pixel initialisation is planned once, before recover, per class slice on the workers (in this process
for one worker), and written to the store class by class: a uint8 pixel file (`state/init/c<class>.pt`,
(ipc, C, S, S)) and the provenance of its images (`state/init/c<class>.json`: source index in the training
split, source file where there is one, crop box, teacher loss). Each class draws from its own generator
(seed, class), so the plan does not depend on how the classes were sliced. Recover units (in this process or
on Ray workers) read their classes' files, so a resumed or distributed run starts every image from the
same pixels.
"""

from scdd.recover.init import inits as _inits  # noqa: F401  (register the initialisations)
from scdd.recover.init.plan import (
    INITS,
    InitPlan,
    InitReader,
    Origin,
    init_planned,
    init_reader,
    mark_init_planned,
    plan_init_classes,
)

__all__ = ["INITS", "InitPlan", "InitReader", "Origin", "init_planned", "init_reader", "mark_init_planned",
           "plan_init_classes"]
