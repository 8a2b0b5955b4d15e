PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# transformers' video processor (the tests' oracle) needs torchvision, whose PyPI wheel is a CUDA
# build that cannot load beside the CPU torch: it goes, without dependencies, into a folder off
# the environment's path that only scripts/testkit/video_oracle.py reads.
ORACLE := $(VENV)/oracle/.installed

.PHONY: setup test lint format demo serve proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(ORACLE): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/oracle torchvision==0.28.0
	touch $(ORACLE)

setup: $(STAMP) $(ORACLE)

test: $(STAMP) $(ORACLE)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Reformats the tree (the style test and `make lint` check it).
format: $(STAMP)
	$(BIN)/ruff format .

# Model and addresses for `make demo` / `make serve`; override e.g. `make serve HTTP_PORT=9000`.
MODEL ?= models/shapes-vl
HOST ?= 127.0.0.1
ENCODE_PORT ?= 50051
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001

# Starts both services on free loopback ports, streams 8 held-out questions through the openai
# client, prints answers, accuracy and time to first token, then stops the services. FP8=1 serves
# a block FP8 copy of the model (written under .cache/fp8, rewritten when the model changes).
demo: $(STAMP)
	$(BIN)/python -m scripts.demo --model $(MODEL) $(if $(FP8),--fp8)

# Both services in the foreground until Ctrl-C: encode gRPC on 127.0.0.1:50051, OpenAI HTTP on
# 127.0.0.1:8000, language gRPC on 127.0.0.1:8001 (the defaults above).
serve: $(STAMP)
	$(BIN)/python -m scripts.demo serve --model $(MODEL) $(if $(FP8),--fp8) --host $(HOST) \
		--encode-port $(ENCODE_PORT) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

# Regenerates the committed gRPC modules from every .proto under proto/.
proto: $(STAMP)
	$(BIN)/python -m proto.codegen

clean:
	rm -rf $(VENV) .pytest_cache
