"""Device check for generation (issue 16), to run when a GPU is lent: `python bench/device_check_generation.py cuda`.

Prints one PASS/FAIL line a check: cached decoding equals full recomputation and transformers' sampling on the
device, top-p's boundary, the eval ternary weights following a CUDA fused AdamW step and .data writes (new student
and load_ternary), load_ternary's exact logits on the device, one quantization per generate call, generate_text's
empty and too-long prompts; then one tokens/s figure (information only). `cpu` runs the same checks here.
Not run on a GPU yet (no device was lent to the session that wrote it).
"""
import os, sys, time, tempfile
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
import torch
import spoonfeed_helpers as sf
from conftest import tiny_student_config, make_tokenizer
from test_generation import _hf_list, _reference_generate, RecordingStreamer

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
print("torch", torch.__version__, "device", dev, torch.cuda.get_device_name() if dev.type == "cuda" else "")
import transformers; print("transformers", transformers.__version__)
fails = 0
def check(name, ok):
    global fails
    fails += not ok
    print(("PASS " if ok else "FAIL ") + name, flush=True)

torch.manual_seed(3)
cfg = tiny_student_config()
model = sf.BitNetStudent(cfg).to(dev).eval()
prompt = torch.randint(0, 64, (3, 5), device=dev)
with torch.no_grad():
    ids = prompt
    for _ in range(20):
        ids = torch.cat([ids, model.logits(model(ids))[:, -1].argmax(-1, keepdim=True)], 1)
check("cached greedy == full recompute", torch.equal(sf.generate(model, prompt, 20, temperature=0), ids))
for s in [(0.7, 50, 0.95, None, 1.0), (0.9, 20, 0.9, 0.05, 1.3)]:
    exp = _reference_generate(model, prompt, 15, _hf_list(*s), torch.Generator(dev).manual_seed(11))
    got = sf.generate(model, prompt, 15, s[0], s[1], s[2], generator=torch.Generator(dev).manual_seed(11),
                      min_p=s[3], repetition_penalty=s[4])
    check(f"sampling {s} == transformers reference", torch.equal(got, exp))
logits = torch.tensor([0.5, 0.3, 0.1, 0.1], device=dev).log().expand(4000, 4)
d = sf._sample_next(logits, torch.zeros(4000, 1, dtype=torch.long, device=dev), sf.logits_processors(1.0, 0, 0.8),
                    True, torch.Generator(dev).manual_seed(0))
check("top_p 0.8 on [.5,.3,.1,.1] draws only {0,1}", set(d.tolist()) == {0, 1})

def fresh(m):
    r = sf.BitNetStudent(m.cfg).to(dev); r.load_state_dict(m.state_dict()); return r.eval()

idx = torch.randint(0, 64, (2, 6), device=dev)

def step(m, opt):
    m.train(); m.logits(m(torch.randint(0, 64, (2, 6), device=dev))).logsumexp(-1).mean().backward()
    m.eval()
    with torch.no_grad(): m.logits(m(idx))
    opt.step()

torch.manual_seed(99); other = sf.BitNetStudent(cfg).to(dev)
writes = {
    "fused AdamW (CUDA kernel)": lambda m: step(m, torch.optim.AdamW(m.parameters(), lr=0.05, fused=True)),
    "trainer's _adamw": lambda m: step(m, sf._adamw(m.parameters(), 0.05, 0.0)),
    "param.data.copy_": lambda m: [p.data.copy_(q) for p, q in zip(m.parameters(), other.parameters())],
    "_foreach_lerp_ on .data": lambda m: torch._foreach_lerp_([p.data for p in m.parameters()],
                                                              [q.data for q in other.parameters()], 0.5),
    "load_state_dict": lambda m: m.load_state_dict(other.state_dict()),
}
tmp = tempfile.mkdtemp()
for source in ("built", "load_ternary"):
    for name, write in writes.items():
        torch.manual_seed(0)
        m = sf.BitNetStudent(cfg)
        if source == "load_ternary":
            sf.export_ternary(m, tmp + "/t"); m = sf.load_ternary(tmp + "/t", device=dev)
        m = m.to(dev).eval()
        sf.generate(m, idx[:, :3], 6, temperature=0)
        key = [(b.weight._version, b.weight.data_ptr()) for _, b in m.bitlinears()]
        write(m); m.zero_grad(set_to_none=True)
        same_key = key == [(b.weight._version, b.weight.data_ptr()) for _, b in m.bitlinears()]
        r = fresh(m)
        with torch.no_grad():
            ok = torch.equal(m.logits(m(idx)), r.logits(r(idx)))
        ok &= torch.equal(sf.generate(m, idx[:, :3], 6, temperature=0), sf.generate(r, idx[:, :3], 6, temperature=0))
        check(f"{source}: eval weights follow {name} (old (_version, data_ptr) key unchanged: {same_key})", ok)

torch.manual_seed(1)  # load_ternary on the device gives the source's eval logits exactly
src = sf.BitNetStudent(tiny_student_config(n_layers=3))
bl = {n for n, _ in src.bitlinears()}
with torch.no_grad():
    for n, p in src.named_parameters():
        if n.rsplit(".", 1)[0] not in bl: p.copy_(p.half().float())
sf.export_ternary(src, tmp + "/x")
loaded = sf.load_ternary(tmp + "/x", device=dev)
src = src.to(dev).eval()
with torch.no_grad():
    check(f"load_ternary(device={dev}) eval logits == source exactly",
          torch.equal(loaded.logits(loaded(idx)), src.logits(src(idx))))
calls = []; real = sf.quantize_weight
sf.quantize_weight = lambda w: calls.append(1) or real(w)
sf.generate(model, prompt, 10, temperature=0)
sf.quantize_weight = real
check(f"generate quantizes each BitLinear once ({len(calls)} calls)", len(calls) == len(model.bitlinears()))

tok = make_tokenizer()
m = sf.BitNetStudent(tiny_student_config(vocab_size=len(tok), max_seq_len=8)).to(dev).eval()
st = RecordingStreamer()
res = sf.generate_text(m, tok, ["", "the dog sat on a big red mat", "a bird"], 4, 1.0, streamer=st)
check("generate_text: empty prompt from EOS, long prompt skipped alone",
      res[0].error is None and st.puts[0].tolist() == [[tok.eos_token_id]] and bool(res[1].error)
      and res[2].error is None)
big = sf.BitNetStudent(tiny_student_config(dim=256, n_layers=4, n_heads=4, vocab_size=49152, max_seq_len=160))
big = big.to(dev).eval()
sf.generate(big, torch.zeros(1, 4, dtype=torch.long, device=dev), 128, temperature=0); sync()
t = time.perf_counter()
sf.generate(big, torch.zeros(1, 4, dtype=torch.long, device=dev), 128, 0.7, 50, 0.95,
            generator=torch.Generator(dev).manual_seed(0)); sync()
print(f"info: 128 sampled tokens, 256x4x4 student, vocab 49152: {128 / (time.perf_counter() - t):.0f} tok/s")
print("ALL PASS" if fails == 0 else f"{fails} FAILED")
