# Dry mode of the examples, sourced by them when DRY_RUN=1: the tiny superspace, the digits set (written to
# $OUT/data/digits) and 2 CPU ranks (gloo), each command for a step or two with its real flags, so that every
# command runs and hands its files to the next one. The arrays are appended to the commands' own flags (the
# last value of a flag wins). Latency windows wide enough for every tiny space and subnet.
NGPU=2 SUPERSPACE=tiny DEVICE=cpu HW=32 PLATFORM=ort_int8
SPACE_LAT=100 SUBNET_LAT=100 SUBNET_DELTA=100 CONFIG=supernet_training_configs/tiny.yaml
IMAGENET=$OUT/data/digits
export OMP_NUM_THREADS=1
python prepare_data.py --data_dir "$IMAGENET" --size 32
KD=(--epochs 1 --max_steps_per_epoch 1 --batch_size 16 --valid_size 32 --eval_batch_size 32 --num_calib_batches 1
    --teacher_epochs 1 --no_progress)
TABLE=(--num_subnets 1 --num_calib 2 --min_runs 1 --min_time 0 --resolutions 32 --no_progress)
LUT=(--num_samples 2 --valid_size 32 --calib_batch_size 16 --no_progress)
SPACE_SEARCH=(--hw_list 32 --population 8 --parents 4 --cycles 16 --num_samples 2000 --no_progress)
SUPERNET=(--epochs 1 --lsq_epochs 1 --max_train_samples 64 --batch_size_per_gpu 16 --valid_size 32
          --bn_calib_batches 1 --no_progress)
SEARCH=(--population 4 --iterations 1 --num_mutations 2 --num_crossovers 2 --holdout_size 32 --num_calib_batches 1
        --calib_batch_size 16 --batch_size 32 --eval_top 2 --no_progress)
