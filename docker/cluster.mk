# The compose cluster (docs/cluster.md): included from the Makefile.
#   make cluster-up [WORKERS=2] [GPU_WORKERS=1]   build the images, start everything, wait for it
#   make cluster-submit SPEC=sweeps/smoke.yaml      `ray job submit` a sweep on the head
#   make cluster-down                               stop it (data volumes are kept)
# docker/.env holds the secrets; the first `make cluster-up` writes it with random values.
COMPOSE := docker compose -f docker/compose.yaml --env-file docker/.env
WORKERS ?= 1
GPU_WORKERS ?= 0
SPEC ?= sweeps/smoke.yaml
CLUSTER_PROFILES := $(if $(filter-out 0,$(GPU_WORKERS)),--profile gpu,)

.PHONY: cluster-env cluster-build cluster-up cluster-submit cluster-status cluster-logs cluster-down

cluster-env: docker/.env  ## docker/.env with fresh random secrets (once)

docker/.env:
	sh docker/make-env.sh docker/.env.template $@

cluster-build: docker/.env  ## build the platform and MLflow images
	$(COMPOSE) $(CLUSTER_PROFILES) build

cluster-up: docker/.env  ## PostgreSQL, object store, MLflow, Ray head and WORKERS workers
	$(COMPOSE) $(CLUSTER_PROFILES) up -d --build --wait \
		--scale ray-worker=$(WORKERS) $(if $(CLUSTER_PROFILES),--scale ray-worker-gpu=$(GPU_WORKERS),)
	@. ./docker/.env && echo "MLflow UI: http://127.0.0.1:$${MLFLOW_HOST_PORT:-5000} (user $${MLFLOW_ADMIN_USERNAME:-admin}, password MLFLOW_ADMIN_PASSWORD in docker/.env)" \
		&& echo "Ray dashboard: http://127.0.0.1:$${RAY_DASHBOARD_HOST_PORT:-8265}"

cluster-submit: docker/.env  ## run SPEC (a file under sweeps/) on the cluster
	@case "$(SPEC)" in sweeps/*.yaml) test -f "$(SPEC)" ;; *) false ;; esac \
		|| { echo "SPEC must be an existing sweeps/<name>.yaml (sweeps/ is mounted on the head)" >&2; exit 2; }
	$(COMPOSE) exec ray-head ray job submit --address http://127.0.0.1:8265 --working-dir /app \
		-- duosparse sweep run $(SPEC)

cluster-status: docker/.env
	$(COMPOSE) ps
	$(COMPOSE) exec ray-head ray status

cluster-logs: docker/.env
	$(COMPOSE) logs --tail=200 -f

cluster-down: docker/.env  ## stop and remove the containers; volumes (runs, artifacts) stay
	$(COMPOSE) --profile gpu down
