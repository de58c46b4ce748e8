terraform {
  # 1.5: lifecycle preconditions. AWS provider 5.50: run_command_targets, input_transformer and
  # role_arn of aws_cloudwatch_event_target, and Automation documents in aws_ssm_document.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.50"
    }
  }
}
