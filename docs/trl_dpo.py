"""Continue the kit's DPO run in TRL, from an exported SFT model and the kit's pairs.jsonl.

    python -m minirlhf export --model RUN/sft --out hf-sft
    python docs/trl_dpo.py --model hf-sft --prefs RUN/prefs/pairs.jsonl --out hf-dpo --max-steps 10

Each DPOConfig field below is the kit's DPOConfig default it stands for (docs/scale.md has the
table and the differences). The same file runs on one GPU as it is, and on several under
`accelerate launch` (docs/scale.md).
"""
import argparse

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="an exported SFT model (python -m minirlhf export)")
parser.add_argument("--prefs", required=True, help="the kit's pairs.jsonl: prompt, chosen, rejected")
parser.add_argument("--out", required=True)
parser.add_argument("--max-steps", type=int, default=300, help="the kit's steps (300; --fast: 30)")
parser.add_argument("--batch-size", type=int, default=24,
                    help="pairs per step: the kit's 4 rankings of K=4 give 4·C(4,2) = 24 pairs")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.model)
tokenizer = AutoTokenizer.from_pretrained(args.model)  # pad = <|endoftext|>, as in the kit
pairs = load_dataset("json", data_files=args.prefs, split="train")  # the field names are TRL's already

config = DPOConfig(
    output_dir=args.out,
    beta=0.25,                               # beta
    loss_type=["sigmoid", "sft"],            # loss_type=sigmoid plus the NLL term on the chosen (RPO) ...
    loss_weights=[1.0, 0.5],                 # ... with nll_coef=0.5 (kit default); ["sigmoid"] alone: nll_coef=0
    label_smoothing=0.0,                     # label_smoothing (used by TRL's "robust", as by the kit's)
    learning_rate=3e-4,                      # lr
    lr_scheduler_type="cosine_with_min_lr",  # linear warm-up, then cosine ...
    lr_scheduler_kwargs={"min_lr_rate": 0.1},  # ... down to lr * min_lr_ratio
    warmup_steps=20,                         # warmup_steps
    max_steps=args.max_steps,                # steps
    per_device_train_batch_size=args.batch_size,
    adam_beta1=0.9, adam_beta2=0.95,         # the kit's AdamW betas
    weight_decay=0.0,                        # weight_decay
    max_grad_norm=1.0,                       # grad_clip
    max_length=model.config.n_positions,     # the model's block_size
    precompute_ref_log_probs=True,           # the reference is the frozen SFT model, scored once (as the kit)
    bf16=False,                              # float32, as the kit (TRL's DPO defaults to bf16)
    gradient_checkpointing=False,            # a tiny model: nothing to save (TRL's DPO defaults to True)
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    seed=args.seed,
)
# ref_model=None: TRL uses the initial policy, i.e. the SFT model, as π_ref, as the kit does
trainer = DPOTrainer(model=model, ref_model=None, args=config, train_dataset=pairs, processing_class=tokenizer)
trainer.train()
trainer.save_model(args.out)
tokenizer.save_pretrained(args.out)
