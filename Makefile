# lcnet-bento: `make demo` on a fresh machine, then `make test`.
VENV      ?= .venv
PY        := $(VENV)/bin/python
DEMO_DIR  ?= data/demo
DEMO_OUT  ?= output/demo
# The demo recipe: 4 drawn shapes x 200 images; PP-LCNet x0.25 from scratch at 64 px,
# data-parallel on 2 cores (batch 32: --procs auto starts 2 processes), >= 0.9 test top-1,
# with an INT8 variant; the accuracy guard then picks the engine `make serve` uses.
DEMO_FIT  ?= --model PPLCNet_x0_25 --pretrained none --input-size 64 --resize-short 72 \
             --epochs 40 --batch-size 32 --lr 0.05 --schedule cosine --warmup-epochs 2 \
             --crop-scale 0.6,1 --int8 --save-dir $(DEMO_OUT) --name pplcnet

export PYTHONUNBUFFERED := 1

.PHONY: install demo demo-train serve test test-fast lint format proto bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[paddlex,onnx,openvino,int8,dev]'
	touch $@

demo-train: install
	$(PY) -m train demo-data $(DEMO_DIR) --images-per-class 200
	$(PY) -m train split $(DEMO_DIR)
	$(PY) -m train fit $(DEMO_DIR) $(DEMO_FIT)
	$(PY) -m lcnet_runner predict --model pplcnet:latest --top-k 3 \
	    "$(DEMO_DIR)/$$(head -n 1 $(DEMO_DIR)/test_list.txt | sed 's/ [0-9]*$$//')"

demo: demo-train serve

# HTTP on :$(PORT), gRPC on :50051 (LCNET_GRPC_PORT); Ctrl+C to stop.
PORT ?= 3000
serve: install
	$(VENV)/bin/bentoml serve . --port $(PORT)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# Under a minute: the tests that neither train nor serve.
test-fast: install
	$(PY) -m pytest -m "not slow" -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# gRPC stubs next to the proto; tests check they are up to date.
proto: install
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. \
	    lcnet_runner/protos/lcnet.proto

# Every benchmark in docs/benchmarks.md (~1.5 h); each prints ratios measured side by side.
# Not bench/ab.py, which compares this tree's server with a revision you name, nor bench/soak.py
# (docs/reliability.md).
bench: install
	$(PY) bench/train_speed.py
	$(PY) bench/train_scaling.py
	$(PY) bench/engines.py
	$(PY) bench/preprocess.py
	$(PY) bench/seed_print.py
	$(PY) bench/vs_paddlex.py
	$(PY) bench/serve.py --variants auto,openvino/fp32,onnxruntime/fp32,paddle/fp32
	$(PY) bench/serve_cpu.py
	$(PY) bench/int8_overflow.py
	$(PY) bench/memory.py
	$(PY) bench/reload_memory.py
	$(PY) bench/vs_peers.py
	$(PY) bench/train_bigdata.py --images 25000 --ram-images 10000 --steps 30

clean:
	rm -rf $(DEMO_DIR) $(DEMO_OUT) .pytest_cache
