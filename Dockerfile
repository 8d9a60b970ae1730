# fct-dist on Ray's own images (ray 2.60.0, Python 3.11, user `ray`), the project installed in /opt/fct-dist:
#   docker build --target cpu -t ghcr.io/your-org/fct-dist:0.1.0-cpu .    # CPU torch + faiss-cpu
#   docker build --target gpu -t ghcr.io/your-org/fct-dist:0.1.0-gpu .    # CUDA torch + faiss-gpu
# The cluster files (cluster/aws.yaml, cluster/kuberay/*.yaml) run the `gpu` image: push it where your nodes
# can pull it and put its name there. Jobs submitted to such a cluster bring only their config.
ARG RAY_VERSION=2.60.0

# the project's files, once, for both targets
FROM scratch AS project
COPY pyproject.toml README.md LICENSE config.yaml requirements-cpu.txt /
COPY fct_dist /fct_dist
COPY jobs /jobs
COPY cluster /cluster

FROM rayproject/ray:${RAY_VERSION}-py311-cpu AS cpu
COPY --from=project --chown=ray:users / /opt/fct-dist
WORKDIR /opt/fct-dist
# PyTorch's CPU index: a bare `torch` resolves PyPI's CUDA build of several GB
RUN pip install --no-cache-dir -r requirements-cpu.txt

FROM rayproject/ray:${RAY_VERSION}-py311-gpu AS gpu
COPY --from=project --chown=ray:users / /opt/fct-dist
WORKDIR /opt/fct-dist
RUN pip install --no-cache-dir -e ".[gpu]"
