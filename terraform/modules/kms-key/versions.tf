terraform {
  # 1.5: lifecycle preconditions and check blocks; the AWS provider 5.50 knows
  # rotation_period_in_days on aws_kms_key.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.50"
    }
  }
}
