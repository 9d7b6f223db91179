"""`python -m services.actuator --pipeline-spec PATH --backend local`"""

from .app import main

if __name__ == "__main__":
    main()
