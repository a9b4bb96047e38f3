"""Export the EMA teacher of a teacher-training checkpoint as a diffusers directory (config.json + safetensors).

    python scripts/export_teacher.py runs/digits/teacher/checkpoints/last.ckpt ard/assets/digits_teacher

Lightning's EMAWeightAveraging callback stores the EMA weights as the checkpoint's `state_dict` (the raw
weights under `current_model_state`); this writes those. The training config goes beside them by hand
(`training_config.yaml`), as shipped in ard/assets/digits_teacher.
"""
import argparse
import sys

from ard.modules.teacher_training import TeacherTraining

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    args = parser.parse_args()
    try:
        print(f"wrote {TeacherTraining.export_ema(args.checkpoint, args.out)}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"export_teacher: error: {e}")
