/* commands: one entry point per subcommand; each returns the process's exit status. */
#ifndef TETHER_COMMANDS_H
#define TETHER_COMMANDS_H

int cmd_relay(int argc, char **argv);
int cmd_agent(int argc, char **argv);
int cmd_forward(int argc, char **argv);
int cmd_status(int argc, char **argv);
int cmd_demo(int argc, char **argv);
int cmd_sftp_server(int argc, char **argv);
int cmd_ssh_proxy(int argc, char **argv);
int cmd_config_ssh(int argc, char **argv);
int cmd_attach(int argc, char **argv);

#endif
