"""``python -m services.agent``: run the node agent with settings from the environment."""

from libs.service import main
from services.agent.app import SERVICE_NAME, run

if __name__ == "__main__":
    main(SERVICE_NAME, run)
