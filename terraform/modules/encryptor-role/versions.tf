terraform {
  # 1.5: lifecycle preconditions. AWS provider 5.81: thumbprint_list of
  # aws_iam_openid_connect_provider is optional (IAM trusts GitHub's CA, not a thumbprint).
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.81"
    }
  }
}
